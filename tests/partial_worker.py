"""Runs one resumable stage through its public function, in its own process, so a test can kill it.

usage: python partial_worker.py <stage> <args.json> <log file>
"""
import json
import logging
import os
import sys
import time

import torch

torch.set_num_threads(1)


def main(stage: str, args_path: str, log_path: str) -> None:
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    a = json.loads(open(args_path).read())
    delay = float(os.environ.get("PARTIAL_WORKER_ITEM_SECONDS", "0"))
    if delay:  # stretch each item's work (not its write) so the test can kill at chosen points
        from persona_em.io import Journal

        append_many = Journal.append_many  # Journal.append goes through append_many too

        def one_at_a_time(self, rows):
            for row in rows:
                time.sleep(delay)
                append_many(self, [row])

        Journal.append_many = one_at_a_time
    save_delay = float(os.environ.get("PARTIAL_WORKER_SAVE_SECONDS", "0"))
    if save_delay:  # stretch each adapter save after its files are written: a kill then lands mid-write
        from peft import PeftModel

        save_pretrained = PeftModel.save_pretrained

        def slow_save(self, *args, **kwargs):
            save_pretrained(self, *args, **kwargs)
            time.sleep(save_delay)

        PeftModel.save_pretrained = slow_save
    step_delay = float(os.environ.get("PARTIAL_WORKER_STEP_SECONDS", "0"))
    if step_delay:  # stretch each optimizer step of any trainer (EM has its own setting: slow_down_seconds)
        from transformers.trainer_callback import CallbackHandler

        on_step_end = CallbackHandler.on_step_end

        def slow_step_end(self, *args, **kwargs):
            time.sleep(step_delay)
            return on_step_end(self, *args, **kwargs)

        CallbackHandler.on_step_end = slow_step_end
    from persona_em.config import Cell

    if stage == "train":
        from persona_em.training.em import train_em

        train_em(Cell(**a["cell"]), a["model_dir"], None, a["train"], a["settings"], a["schedule"], a["work"],
                 a["out"], a["log_table"])
    elif stage == "sample":
        from persona_em.sampling.sample import sample_cell

        sample_cell(Cell(**a["cell"]), a["model_dir"], None, a["checkpoints"], a["questions"], a["settings"],
                    a["journal"], a["out"])
    elif stage == "judge":
        from persona_em.judging.run import judge_samples

        judge_samples(a["samples"], a["questions"], a["name"], a["judge"], a["model_dir"], a["journal"], a["out"],
                      judge_key=a["judge_key"])
    elif stage == "dpo":
        from persona_em.persona.train_dpo import train_dpo

        train_dpo("p", "tiny", a["model_dir"], a["pairs"], a["settings"], a["work"], a["out"])
    elif stage == "sft":
        from persona_em.persona.introspection import train_sft

        train_sft("p", "tiny", a["model_dir"], a["dpo"], a["data"], a["settings"], a["work"], a["out"])
    else:
        raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    main(*sys.argv[1:])
