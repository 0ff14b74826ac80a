"""What judging costs: token estimates before spending, the price of a call, the estimate announced before a run."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters per token), for the cost estimate before spending."""
    return len(text) // 4 + 8


def call_cost(cfg: dict, prompt_tokens: float, completion_tokens: float) -> float | None:
    p_in, p_out = cfg.get("price_per_million_input_tokens"), cfg.get("price_per_million_output_tokens")
    if p_in is None or p_out is None:
        return None
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


def announce_cost(cfg: dict, todo: list) -> None:
    """Log (and print) the run's estimated cost before spending; set each job's `est_cost` (run._Job) for the budget."""
    out = {j.key: j.out_tokens(cfg) for j in todo}
    in_tokens = sum(estimate_tokens(j.prompt) for j in todo)
    out_total = sum(out.values())
    total = call_cost(cfg, in_tokens, out_total)
    for j in todo:
        j.est_cost = call_cost(cfg, estimate_tokens(j.prompt), out[j.key])
    if total is None:
        msg = (f"judge {cfg['name']}: {len(todo)} calls, ~{in_tokens} input tokens; cost unknown (set "
               f"price_per_million_input_tokens / price_per_million_output_tokens to get an estimate)")
    else:
        budget = cfg.get("budget_usd")
        msg = (f"judge {cfg['name']}: {len(todo)} calls, ~{in_tokens} input + {out_total} output "
               f"tokens, estimated cost ${total:.4f}" + (f" (budget cap ${budget:.4f} for this judge, over all "
                                                         f"jobs sharing the cache)" if budget is not None else ""))
    log.info("%s", msg)
    print(msg, file=sys.stderr, flush=True)

