"""``phantomdeq sample``: write text with a trained language model.

    phantomdeq sample RUN [--prompt "ROMEO:"] [--tokens 300] [--temperature 0.8]
                      [--top-k 40] [--seed 0] [--device cpu] [--set key=value ...]

``RUN`` is a run folder of ``task.name: language_modelling`` (its ``best.pt``, else its
``last.pt``) or a checkpoint file. The model comes from the config stored in the checkpoint and
the vocabulary saved with the run (in the checkpoint); the prompt is encoded with that
vocabulary (a character it lacks is a one-line error naming it), continued by ``--tokens``
sampled characters (the model in eval mode: a DEQ uses its eval solver; each step reads the
last ``context`` tokens), and printed to stdout, prompt included. ``--seed`` makes the draw
reproducible.

Exit status: 0 on success; 2 (one line on stderr) for a bad option, a run that is not a
language model, a missing or corrupted checkpoint and a prompt character outside the
vocabulary; 1 when the model produces non-finite values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phantomdeq.cli import HelpFormatter, user_error
from phantomdeq.data import DataError
from phantomdeq.errors import DEQError

from .config import ConfigError, apply_overrides, config_from_dict, parse_overrides
from .run_folder import CheckpointError, load_checkpoint

__all__ = ["build_parser", "main"]

PROG = "phantomdeq sample"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write text with a trained language model (task.name: language_modelling).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "run",
        type=Path,
        metavar="RUN",
        help="a run folder (its best.pt, else last.pt) or a checkpoint",
    )
    p.add_argument(
        "--prompt", default=None, help="the text to continue (default: a newline character)"
    )
    p.add_argument("--tokens", type=int, default=300, help="characters to generate (>= 0)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="divides the logits (> 0; lower: safer)"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the k most likely characters (>= 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the stored config, e.g. --set eval_solver.max_iter=60",
    )
    return p


def _check_options(args: argparse.Namespace) -> None:
    if args.tokens < 0:
        raise ConfigError(f"--tokens: must be >= 0, got {args.tokens}")
    if not args.temperature > 0 or args.temperature != args.temperature:
        raise ConfigError(f"--temperature: must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k: must be >= 1 (or left out for all), got {args.top_k}")
    if args.prompt is None:
        args.prompt = "\n"
    if not args.prompt:
        raise ConfigError("--prompt: must not be empty (the model needs a first character)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from phantomdeq.data import CharVocab

    from .build import build_model, resolve_device
    from .commands import resolve_checkpoint
    from .distributed import DistInfo
    from .run_folder import check_finite_weights, load_model_weights

    try:
        _check_options(args)
        path = resolve_checkpoint(args.run)
        source = str(path)
        state = load_checkpoint(
            path, on_unverified=lambda m: print(f"phantomdeq: {m}", file=sys.stderr)
        )
        stored = config_from_dict(state["config"])
        if stored.task.name != "language_modelling" or state.get("vocab") is None:
            raise ConfigError(
                f"{source!r} is a {stored.task.name} run without a vocabulary; sample needs a "
                "run trained with task.name: language_modelling"
            )
        raw = apply_overrides(state["config"], parse_overrides(args.overrides))
        raw = apply_overrides(raw, [("train.device", args.device)])
        cfg = config_from_dict(raw)
        vocab = CharVocab.from_dict(state["vocab"], where=f"{source} vocab")
        device = resolve_device(cfg.train.device, DistInfo())
        info = {"vocab_size": vocab.size, "context": int(stored.data.context or 1), "vocab": vocab}
        model = build_model(cfg, info=info)
        load_model_weights(model, state["model"], source=source, stored=stored, requested=cfg)
        check_finite_weights(model, source=source)
        model.to(device, getattr(torch, cfg.train.dtype))
        prompt = vocab.encode(args.prompt, where="--prompt")[None, :].to(device)
        generator = torch.Generator().manual_seed(args.seed)
        generate = getattr(model, "generate", None)
        if not callable(generate):
            raise ConfigError(
                f"{source!r}: the model {type(model).__name__} has no generate(idx, tokens, ...)"
            )
        with torch.no_grad():
            out = generate(
                prompt,
                args.tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                generator=generator,
            )
    except (ConfigError, CheckpointError, DataError) as exc:
        return user_error(PROG, str(exc), 2)
    except DEQError as exc:
        return user_error(PROG, f"sampling produced non-finite values ({exc})", 1)
    sys.stdout.write(vocab.decode(out[0].cpu()))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
