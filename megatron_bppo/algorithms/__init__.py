"""Pure tensor algorithms of BPPO / GRPO (no torch.distributed, no Megatron): see docs/algorithm.md.

    rewards --group_advantages--> advantages --get_selector(...)--> update mask
    --PrefixRule.group_lengths--> k --(prompt + first k response tokens)--> training sequences --policy_loss--> loss
    AdaptiveScheduler decides how many completions each prompt gets; StepSchedule applies it as completions finish;
    unselectable_running: which running completions binary selection can no longer pick (early stop).
"""
from .advantages import ADVANTAGE_MODES, check_rewards, group_advantages, group_stats, uniform_groups
from .losses import AGGREGATIONS, KL_ESTIMATORS, ROLLOUT_IS_MODES, aggregate, kl_penalty, policy_loss
from .prefix import PAIR_PREFIX_MODES, PREFIX_MODES, PrefixRule
from .scheduling import COUNTERS as SCHEDULER_COUNTERS
from .scheduling import HISTORY_WINDOW as SCHEDULER_HISTORY_WINDOW
from .scheduling import AdaptiveScheduler, StepSchedule
from .selection import (EARLY_STOP_POLICIES, PAIR_SELECTORS, PAIR_WEIGHTINGS, SELECTORS, SelectionResult,
                        get_selector, register_selector, select_all, select_binary, select_max_variance,
                        select_random_pair, selector_options, unselectable_running, weight_selected_advantages)

__all__ = [
    "ADVANTAGE_MODES", "check_rewards", "group_advantages", "group_stats",
    "uniform_groups",
    "AGGREGATIONS", "KL_ESTIMATORS", "ROLLOUT_IS_MODES", "aggregate", "kl_penalty", "policy_loss",
    "PAIR_PREFIX_MODES", "PREFIX_MODES", "PrefixRule",
    "SCHEDULER_COUNTERS", "SCHEDULER_HISTORY_WINDOW", "AdaptiveScheduler", "StepSchedule",
    "EARLY_STOP_POLICIES", "PAIR_SELECTORS", "PAIR_WEIGHTINGS", "SELECTORS", "unselectable_running", "SelectionResult",
    "get_selector",
    "register_selector", "select_all", "select_binary", "select_max_variance", "select_random_pair",
    "selector_options", "weight_selected_advantages",
]
