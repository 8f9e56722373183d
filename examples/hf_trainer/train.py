"""An ordinary Hugging Face ``Trainer`` script for a causal LM, nothing muon_ds-specific in it.

It gets Moonlight's Muon from its DeepSpeed JSON (``"optimizer": {"type": "Muon", ...}``) when
muon_ds is installed (the wheel's autoload hook patches DeepSpeed on import). From a source
checkout without ``pip install``, start it with ``python -c "import muon_ds, runpy; ..."`` instead
(see examples/hf_trainer/README.md). Launch with ``torchrun``, ``deepspeed`` or ``accelerate``.
Its one muon_ds line gives DeepSpeed's process groups the Trainer's ``--ddp_timeout`` too (torch gives
groups made after start-up its 30-minute default), so a stalled rank fails the job in that time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments

from examples.demo import corpus
from muon_ds.deepspeed.collectives import set_default_timeout

HERE = Path(__file__).resolve().parent


@dataclass
class ScriptArguments:
    model_config: str = field(default=str(HERE / "tiny_moonlight.json"),
                              metadata={"help": "a transformers config.json; the model starts from random weights"})
    data_dir: str = field(default="", metadata={"help": "text files to train on (default: Python's stdlib)"})
    seq_len: int = field(default=128, metadata={"help": "tokens (bytes) per sequence"})


class ByteWindows(torch.utils.data.Dataset):
    """Fixed windows of byte tokens; the model shifts labels itself."""

    def __init__(self, data: torch.Tensor, seq_len: int, count: int) -> None:
        self.data, self.seq_len = data, seq_len
        self.starts = torch.linspace(0, data.numel() - seq_len - 1, count).long()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = corpus.windows(self.data, self.starts[index:index + 1], self.seq_len)[0]
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    set_default_timeout(args.ddp_timeout_delta)
    root = Path(script.data_dir) if script.data_dir else corpus.default_root()
    corpus.check_root(root, script.seq_len)
    if not Path(script.model_config).is_file():
        raise SystemExit(f"error: --model_config {script.model_config} not found")
    train_data, val_data = corpus.split(root)
    sequences = max(args.max_steps, 1) * args.per_device_train_batch_size * args.gradient_accumulation_steps \
        * args.world_size
    if args.deepspeed and args.use_cpu and torch.distributed.is_initialized():
        # Under ZeRO-3 the model is built in deepspeed.zero.Init, which takes the world size from
        # deepspeed.comm; on CPU the Trainer initializes only torch.distributed.
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(script.model_config))
    trainer = Trainer(model=model, args=args,
                      train_dataset=ByteWindows(train_data, script.seq_len, sequences),
                      eval_dataset=ByteWindows(val_data, script.seq_len, 16 * args.world_size))
    result = trainer.train()
    metrics = {**result.metrics, **trainer.evaluate()}
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    if torch.distributed.is_initialized():
        # Leave no communication threads running into interpreter shutdown (seen to abort a rank under load),
        # and leave together, so that no rank tears down its connections while another still uses them.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
