"""`hybrids data sample`: write examples of a synthetic task to an .npz file and print a few of them decoded.

    hybrids data sample task=multiquery_ar task.num_kv_pairs=4 n=16 seed=1 out=mqar.npz

The file holds `input_ids` and `targets`, int64 arrays of shape (n, seq_len) in the causal-LM convention of the
tasks (targets[i, t] is the token to predict after reading input_ids[i, :t+1], -100 where nothing is scored):
exactly the first training batch of size n that `hybrids train` would see with the same task settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from blocks import ConfigError
from hybrids.training.tasks.base import IGNORE_INDEX, SPLITS, Batch
from hybrids.training.tasks.registry import make_task

USAGE = "hybrids data sample task=<name> [task.<key>=<value> ...] [n=8] [seed=0] [split=train] [show=3] [out=FILE.npz]"
TOP_KEYS = ("task", "n", "seed", "split", "show", "out", "overwrite")


def parse(options: list[str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """key=value words -> (task name, task options, the command's own options); values are read as YAML.

    Raises:
        ConfigError: a word without "=", an unknown key, a repeated key, or no task.
    """
    task_options: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for word in options:
        key, sep, text = word.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {word!r}; usage: {USAGE}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"value of {key!r} is not valid YAML: {text!r}") from None
        if key.startswith("task."):
            target, key = task_options, key.removeprefix("task.")
        elif key in TOP_KEYS:
            target = top
        else:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(TOP_KEYS)} and task.<option>")
        if key in target:
            raise ConfigError(f"{word.partition('=')[0]!r} is given twice")
        target[key] = value
    if "task" not in top:
        raise ConfigError(f"name the task: {USAGE}")
    if "seed" in top:
        if "seed" in task_options and task_options["seed"] != top["seed"]:
            raise ConfigError(f"seed={top['seed']} and task.seed={task_options['seed']} disagree; give one")
        task_options["seed"] = top["seed"]
    return str(top["task"]), task_options, top


def _positive(top: dict[str, Any], key: str, default: int) -> int:
    value = top.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "n" else 0):
        raise ConfigError(f"{key} must be a {'positive' if key == 'n' else 'non-negative'} int, got {value!r}")
    return value


def decode(input_ids: np.ndarray, targets: np.ndarray) -> str:
    """One example as token ids; a scored position reads `token[target]` (after `token`, predict `target`)."""
    words = [f"{x}[{y}]" if y != IGNORE_INDEX else str(x) for x, y in zip(input_ids.tolist(), targets.tolist(),
                                                                          strict=True)]
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > 100:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join("    " + text for text in [*lines, line])


def sample(options: list[str]) -> Batch:
    """Run the command: build the task, draw n examples, print a few, write them when out= is given.

    Args:
        options: the words after `hybrids data sample`.

    Returns:
        The batch written (int64 tensors).

    Raises:
        ConfigError: bad options (see `parse`), a bad task name or option, or an output file that exists
            (without overwrite=true) or cannot be written.
    """
    name, task_options, top = parse(options)
    n, show = _positive(top, "n", 8), _positive(top, "show", 3)
    split = top.get("split", "train")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    out = top.get("out")
    if out is not None:
        out = Path(str(out))
        if out.suffix != ".npz":
            raise ConfigError(f"out must name an .npz file, got {str(out)!r}")
        if out.exists() and top.get("overwrite") is not True:
            raise ConfigError(f"{out} exists; choose another out= or add overwrite=true")
    task = make_task(name, **task_options)
    batch = task.batch(0, n, split)
    input_ids, targets = batch.input_ids.numpy(), batch.targets.numpy()
    print(f"task {name}: vocab_size {task.vocab_size}, seq_len {task.seq_len}, split {split}, {task.config}")
    scored = (targets != IGNORE_INDEX).sum(axis=1)
    print(f"{n} examples, {scored.mean():.1f} scored positions per example (min {scored.min()}, max {scored.max()}); "
          "token[target] marks a scored position: after reading token, the model must predict target")
    for i in range(min(show, n)):
        print(f"  example {i}:")
        print(decode(input_ids[i], targets[i]))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(out, input_ids=input_ids.astype(np.int64), targets=targets.astype(np.int64))
        except OSError as err:
            raise ConfigError(f"cannot write {out}: {err.strerror or err}") from None
        print(f"wrote {out}: input_ids and targets, int64 {input_ids.shape}")
    return batch
