"""The per-worker train loop (one function for every task), run by Ray Train's TorchTrainer on each worker.

Per optimizer step: `accumulation` micro-batches of `per_worker_batch_size` rows from this worker's shard
(DDP gradient sync only on the last), then clip, AdamW step and the warmup-linear scheduler; precision, fused AdamW,
gradient checkpointing and torch.compile come from the card's optim section (training/step.py). A task with an
upstream stage (Task.upstream: captioning, retrieval, pretraining) gets ready numpy columns and only does the per-step part
(`step_batch`: masking, negatives, pollution); SCST tensorises joined records in the worker (`make_batch`).
Every `validation.every_steps` steps (and at the end) rank 0 validates and every rank calls `ray.train.report`
(a barrier); every `checkpoint_every` steps rank 0 attaches a full-state checkpoint:

    config.json, model.safetensors, vocab.txt   a model dir: `from_pretrained` loads a checkpoint directly
    train_state.pt                              optimizer, scheduler, step, data position (epoch, batches into it),
                                                task state (drop-worst counter)
    history.json                                every metrics dict reported so far (the driver writes the metrics
                                                file and plots from the final checkpoint's copy)

    rng_rank<r>.pt                              each rank's RNG streams (torch CPU, CUDA, numpy)

Restore (`ray.train.get_checkpoint()`, after a worker failure or when a run of the same name is re-submitted)
loads all of it; every rank continues its own RNG streams. The data position is honoured by skipping that many raw
batches of the resumed epoch, whose shuffle is seeded by (seed, epoch, rank) (see `micro_batches` for what that
makes exact).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mengzi_ray import storage
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.card import TrainCard
from mengzi_ray.training.examples import to_records
from mengzi_ray.training.optim import build_optimizer, warmup_linear
from mengzi_ray.training.step import StepOptions, TrainStep
from mengzi_ray.training.tasks import Task, task_for

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
FAULT_MARKER = "fault_drill_fired"


@dataclass
class DataPosition:
    epoch: int = 0
    batches: int = 0  # micro-batches consumed in `epoch`


@dataclass
class LoopState:
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    history: list[dict[str, Any]] = field(default_factory=list)


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local-shuffle seed of one epoch on one rank: a resumed epoch replays the same order."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


Micro = list[ImageRecord] | dict[str, np.ndarray]
"""One micro-batch as the loop gets it: joined rows as records, or a task's upstream columns (numpy, leading axis)."""

PREFETCH_BATCHES = 4
"""Micro-batches Ray Data fetches ahead of the one being trained on (formatted in a background thread)."""


def micro_batches(
    shard: Any, batch_size: int, shuffle_buffer: int, position: DataPosition, cache: bool = False,
    *, seed: int = 0, rank: int = 0, prepared: bool = False,
) -> Iterator[Micro]:
    """Endless micro-batches, epoch after epoch; `position` is updated as batches are taken, and a non-zero
    `position.batches` at the start skips that many raw batches of the resumed epoch (not converted).
    Without `prepared` the shard holds joined rows, delivered as ImageRecords (`to_records`); with it the shard
    holds the columns of the task's upstream stage (Task.upstream), delivered as numpy arrays as they come.
    The local shuffle is seeded by (seed, epoch, rank) and the train dataset's block order by the seed
    (jobs.build_trainer, which also keeps Ray Data's output order), so the skipped batches are the ones the
    interrupted run consumed: exact for one worker; with several, Ray Data's streaming split hands blocks to
    workers as they ask, so a resumed epoch keeps its length but not its per-worker assignment.
    ValueError when an epoch holds no full micro-batch (the shard is smaller than batch_size), which would
    otherwise loop forever.

    With `cache` (data.cache_in_workers) epoch 0 streams from the shard and keeps its rows; later epochs are
    permutations of those rows seeded by (seed, epoch, rank) instead of re-running the Ray Data pipeline (small
    datasets, where a pipeline execution per epoch would cost more than the epoch). A run resumed in a later
    epoch first re-reads epoch 0 into the cache without yielding it, so its permutation is the interrupted one."""
    skip = position.batches
    convert = (lambda raw: raw) if prepared else (lambda raw: to_records(raw))  # to_records looked up per call
    stored: Micro | None = None  # epoch 0's rows, once cached
    while True:
        filling = cache and stored is None
        parts: list[Micro] = []
        if filling and position.epoch > 0:  # resumed past epoch 0: rebuild epoch 0's cache, then permute it
            stored = _concat([convert(raw) for raw in _stream(shard, batch_size, shuffle_buffer, seed, 0, rank, prepared)])
            filling = False
        if stored is not None:
            order = np.random.default_rng(shuffle_seed(seed, position.epoch, rank)).permutation(_length(stored))
            epoch: Iterator[Any] = (_take(stored, order[s : s + batch_size]) for s in range(0, len(order) - batch_size + 1, batch_size))
        else:
            epoch = _stream(shard, batch_size, shuffle_buffer, seed, position.epoch, rank, prepared)
        taken = 0
        for raw in epoch:
            taken += 1
            if skip and not filling:
                skip -= 1
                continue
            rows = raw if stored is not None else convert(raw)
            if filling:
                parts.append(rows)
            if skip:
                skip -= 1
                continue
            position.batches += 1
            yield rows
        if not taken:  # every epoch would be empty: fail instead of spinning forever
            raise ValueError(f"this worker's shard has fewer rows than one micro-batch ({batch_size}): lower "
                             f"batch.per_worker_batch_size or scaling.num_workers, or add data")
        if filling:
            stored = _concat(parts)
        position.epoch += 1
        position.batches = 0


def _length(rows: Micro) -> int:
    return len(rows) if isinstance(rows, list) else len(next(iter(rows.values())))


def _concat(parts: list[Micro]) -> Micro:
    """One epoch's micro-batches as one store (records listed, or each column concatenated)."""
    if not parts or isinstance(parts[0], list):
        return [r for part in parts for r in part]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(rows: Micro, index: np.ndarray) -> Micro:
    return [rows[i] for i in index] if isinstance(rows, list) else {k: v[index] for k, v in rows.items()}


def _stream(
    shard: Any, batch_size: int, shuffle_buffer: int, seed: int, epoch: int, rank: int, prepared: bool = False
) -> Iterator[Any]:
    """One epoch of raw micro-batches from the Ray Data shard (Arrow tables, or numpy columns when `prepared`),
    locally shuffled by (seed, epoch, rank), PREFETCH_BATCHES ahead."""
    return shard.iter_batches(
        batch_size=batch_size, batch_format="numpy" if prepared else "pyarrow", drop_last=True,
        prefetch_batches=PREFETCH_BATCHES, local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=shuffle_seed(seed, epoch, rank) if shuffle_buffer else None,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"card": TrainCard (pickled by Ray), "init_dir": model dir to start from,
    "from_bert": bool, "run_dir": URI of the run (fault-drill marker)}."""
    import ray.train
    import ray.train.torch

    card: TrainCard = config["card"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    init_dir = storage.download_dir(config["init_dir"])
    task = task_for(card, load_tokenizer(init_dir))
    core = task.model_class.from_pretrained(init_dir, from_bert=config["from_bert"], **task.config_overrides())
    core.to(device)
    options = StepOptions.from_card(card.optim, device)
    optimizer = build_optimizer(core, card.optim.learning_rate, card.optim.weight_decay, task.no_decay, fused=options.fused)
    step = TrainStep(core, optimizer, options, device)
    scheduler = warmup_linear(optimizer, card.optim.warmup_steps, card.schedule.max_steps)
    rng = np.random.default_rng([card.optim.seed, rank])
    torch.manual_seed(card.optim.seed + rank)
    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = _restore(Path(d), core, step, scheduler, task, rng, rank, card.optim.seed)
    if task.manual_grad_sync or world == 1:
        model = core
    else:
        model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"find_unused_parameters": task.find_unused_parameters})
    forward = step.forward_module(model)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    val_rows = [r for b in val_shard.iter_batches(batch_format="pyarrow") for r in to_records(b)] if rank == 0 else []

    prepared = task.upstream() is not None  # jobs.build_trainer applied the task's upstream stage to "train"
    batches = micro_batches(
        train_shard, card.batch.per_worker_batch_size, card.data.shuffle_buffer, state.position,
        card.data.cache_in_workers, seed=card.optim.seed, rank=rank, prepared=prepared,
    )
    pool = task.negative_pool(rng)
    accumulation = card.accumulation_steps
    recent: list[float] = []
    waited = 0.0  # seconds blocked on the input pipeline since the last report
    resumed_from = state.step
    while state.step < card.schedule.max_steps:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i in range(accumulation):
            begin = time.perf_counter()
            rows = next(batches)
            waited += time.perf_counter() - begin
            if card.fault_drill and card.fault_drill.log_ids:
                _log_ids(config["run_dir"], rank, state, rows)
            if isinstance(rows, dict):
                arrays = task.step_batch(rows, rng, pool)
            else:
                pool.add(rows)
                arrays = task.make_batch(rows, rng, pool)
            batch = {k: torch.as_tensor(v).to(device) for k, v in arrays.items()}
            sync = model.no_sync() if model is not core and i < accumulation - 1 else contextlib.nullcontext()
            with sync:
                with step.autocast():
                    loss = task.loss(forward, batch) / accumulation
                step.backward(loss)
            step_loss += loss.item()
        if task.manual_grad_sync and world > 1:
            _average_gradients(core, world)
        step.update()
        scheduler.step()
        state.step += 1
        recent.append(step_loss)
        _fault_drill(card, config["run_dir"], rank, state.step)
        if state.step % card.validation.every_steps and state.step != card.schedule.max_steps:
            continue
        metrics: dict[str, Any] = {
            "step": state.step, "train_loss": float(np.mean(recent)), "lr": scheduler.get_last_lr()[0], "resumed_from": resumed_from,
            "wall_time": time.time(),  # seconds since the epoch: throughput between reports (bench_train_ray)
            "data_wait_s": waited,  # input-bound when this nears the time between reports
        }
        recent, waited = [], 0.0
        if rank == 0:
            begin = time.perf_counter()
            metrics.update(task.validate(core, val_rows))
            metrics["validation_s"] = time.perf_counter() - begin  # bench_train_ray takes it out of the step rate
            state.history.append(metrics)
        save = state.step % card.checkpoint_every == 0 or state.step == card.schedule.max_steps
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if save:  # every rank adds its RNG file; Ray Train uploads the ranks' files into one checkpoint dir
                if rank == 0:
                    _save(Path(d), core, step, scheduler, task, rng, state)
                _save_rng(Path(d), rank, rng)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)


def _average_gradients(core: torch.nn.Module, world: int) -> None:
    """All-reduce (mean) every gradient across the workers, as DDP does, for tasks it cannot wrap: one collective
    over all gradients flattened into one buffer, not one per parameter."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in core.parameters() if p.requires_grad]
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)


def _save(d: Path, core: Any, step: TrainStep, scheduler: Any, task: Task, rng: np.random.Generator, state: LoopState) -> None:
    core.save_pretrained(d)
    torch.save(
        {
            "optimizer": step.optimizer.state_dict(),
            "step_state": step.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": state.step,
            "epoch": state.position.epoch,
            "batches_in_epoch": state.position.batches,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": rng.bit_generator.state,
            "task": task.state(core),
        },
        d / STATE_FILE,
    )
    (d / HISTORY_FILE).write_text(json.dumps(state.history, indent=1))


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _save_rng(d: Path, rank: int, rng: np.random.Generator) -> None:
    """This rank's RNG streams: torch CPU, CUDA (every device of the process) and the loop's numpy generator."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": json.dumps(rng.bit_generator.state)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, d / _rng_file(rank))


def _restore(
    d: Path, core: Any, step: TrainStep, scheduler: Any, task: Task, rng: np.random.Generator, rank: int, seed: int
) -> LoopState:
    core.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    core.tie_weights()
    saved = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
    step.optimizer.load_state_dict(saved["optimizer"])
    step.load_state_dict(saved.get("step_state", {}))
    scheduler.load_state_dict(saved["scheduler"])
    task.load_state(core, saved["task"])
    step = int(saved["step"])
    own = d / _rng_file(rank)
    if own.is_file():
        streams = torch.load(own, map_location="cpu", weights_only=True)
        torch.set_rng_state(streams["torch"])
        rng.bit_generator.state = json.loads(streams["numpy"])
        if "cuda" in streams and torch.cuda.is_available() and len(streams["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(streams["cuda"])
    elif rank == 0:  # a checkpoint of an earlier version: rank 0's streams only
        torch.set_rng_state(saved["torch_rng"])
        rng.bit_generator.state = saved["numpy_rng"]
    else:
        torch.manual_seed(seed + rank + 7919 * step)
        rng.bit_generator.state = np.random.default_rng([seed, rank, step]).bit_generator.state
    history = json.loads((d / HISTORY_FILE).read_text())
    return LoopState(step, DataPosition(int(saved["epoch"]), int(saved["batches_in_epoch"])), history)


def _log_ids(run_dir: str, rank: int, state: LoopState, rows: Micro) -> None:
    """fault_drill.log_ids: append one JSON line per micro-batch (the optimizer step it feeds, its epoch, this
    process's pid, the rows' image ids and texts) to <run_dir>/step_ids/rank<r>.jsonl, a local file (the card
    refuses remote run dirs); opened per line so a killed worker leaves every line it took whole."""
    path = Path(run_dir) / "step_ids" / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "step": state.step + 1, "epoch": state.position.epoch, "pid": os.getpid(),
        "examples": ([[r.image_id, r.texts] for r in rows] if isinstance(rows, list)
                     else [[i, [t]] for i, t in zip(rows["image_id"].tolist(), rows["text"].tolist())]),
    }
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")


def _fault_drill(card: TrainCard, run_dir: str, rank: int, step: int) -> None:
    """Fail once (the first time rank `fault_drill.rank` reaches step `fault_drill.at_step` in this run): raise,
    or with `fault_drill.kill` SIGKILL this worker process, as a lost node or an OOM kill would."""
    drill = card.fault_drill
    if drill is None or rank != drill.rank or step != drill.at_step:
        return
    fs, path = storage.filesystem_for(f"{run_dir}/{FAULT_MARKER}")
    if fs.get_file_info(path).type.name != "NotFound":
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(f"rank {rank} {'killed' if drill.kill else 'raised'} at step {step}\n".encode())
    if drill.kill:
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"fault drill: rank {rank} raises at optimizer step {step}")
