"""The persona arm: constitution -> prompts -> teacher/student responses -> DPO pairs -> DPO persona LoRA
(-> optional introspection SFT), and hub personas. The result of every path is a PEFT LoRA adapter directory that
the EM grid composes with its EM adapter through persona_em/compose.py.
"""
