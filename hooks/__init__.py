"""Host hooks: work that runs between jitted train steps, on the host, without recompiling the step.

    @hooks.register_hook("my_refresh", enabled=lambda config: config.my.every > 0)
    def my_refresh(config, model) -> hooks.HostHook:
      return hooks.HostHook(every=config.my.every, refresh=lambda step, state, frozen, tx: (state, frozen))

Any part registers hooks (layer resampling and TempBalance's ESD refresh in `optim`, gradient-entanglement
logging in `diagnostics`); the trainer runs every hook whose `enabled(config)` holds, several in one run,
and names none of them.
"""
from hooks._registry import HostHook, active_hooks, get_hook, hook_names, register_hook
