r"""Listwise preference tuning (LiPO-lambda; also ListNet, ListMLE, PRO) on the built-in list task: K
responses per prompt, the correct answer and corruptions scored by -(wrong digits), ties allowed.

    python main.py --config=configs/sft.py:steps=400 --workdir=/tmp/sft
    python main.py --config=configs/lipo.py --config.model.init_workdir=/tmp/sft --workdir=/tmp/lipo
    python main.py --config=configs/lipo.py:loss=listmle,list_size=6 --config.model.init_workdir=/tmp/sft ...
"""
from configs import dpo
from configs.common import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model="small", task="sort", loss="lipo", list_size=4, steps=300, smoke=False)
  c = dpo.get_config(f"model={arg.model},task={arg.task},steps={arg.steps},kind=listwise"
                     + (",smoke" if arg.smoke else ""))
  c.data.list_size = arg.list_size
  c.batch_size = 16 if not arg.smoke else 8
  c.loss.name = arg.loss                 # lipo | listnet | listmle | pro
  return c
