"""What every rule script does first: send stderr and logging to the rule's log, and turn user errors into one
clear message and a non-zero exit (the function that failed wrote its outputs atomically, so nothing partial stays).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from persona_em.errors import UserError
from persona_em.storage import DISK_ERRORS

log = logging.getLogger("persona_em")


def run(snakemake, main) -> None:
    log_path = Path(snakemake.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log_path, "a", buffering=1, encoding="utf-8")  # append: a retried job's log keeps the history
    sys.stderr = stream
    logging.basicConfig(stream=stream, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Snakemake gives scripts no attempt number; the resources show a retry (runtime grows with each attempt).
    log.info("rule %s, wildcards %s, resources %s", snakemake.rule, dict(snakemake.wildcards.items()),
             {k: v for k, v in snakemake.resources.items() if not k.startswith("_")})
    try:
        main(snakemake)
    except (UserError, OSError) as e:
        if isinstance(e, OSError):
            if e.errno not in DISK_ERRORS:
                log.exception("rule %s failed", snakemake.rule)
                raise
            e = UserError(f"{e.filename or 'an output'}: {DISK_ERRORS[e.errno]} ({e.strerror}): free space there "
                          f"or point the config at another directory")
        log.error("%s", e)
        print(f"ERROR in rule {snakemake.rule}: {e}", file=sys.__stderr__)
        sys.exit(1)
    except BaseException:
        log.exception("rule %s failed", snakemake.rule)
        raise
    log.info("done")


def optional(value) -> str | None:
    """A named input that an input function may leave empty (e.g. no persona)."""
    if isinstance(value, str):
        return value
    return str(value[0]) if len(value) else None
