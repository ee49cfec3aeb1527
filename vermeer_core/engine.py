"""The engine: runs every stage and phase of a spec on FSDP2, with exact resume.

One process is a world of one on the same code path as ``torchrun --nproc-per-node N``.

Randomness is counter-based: the noise, times and caption drops of global sample ``i`` at
global step ``s`` come from a generator seeded by (seed, s, i), and model-internal randomness
from (seed, s, rank). So the RNG state of a run is its step: resume is exact without saving
generator states, and world sizes 1 and N see the same random numbers for the same sample.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from vermeer_core.branch import Branch, copy_history
from vermeer_core.checkpoint import META_KEYS, Checkpointer
from vermeer_core.diffusion import LossWeight, TSampling
from vermeer_core.distributed import DistInfo, default_fsdp_settings, parallelize, reshard_all
from vermeer_core.ema import EMA
from vermeer_core.errors import VermeerError
from vermeer_core.io import atomic_write_text, join
from vermeer_core.meta_init import build_meta_stage, materialize_sharded
from vermeer_core.metrics import MetricsLog, memory_bytes, peak_flops, trim_metrics
from vermeer_core.plan import stage_forward_flops
from vermeer_core.model import (
    VermeerModel, apply_phase, phase_groups, replay, stage_transfers,
)
from vermeer_core.optim import OptimState, build_optimizer, lr_factor, park_state, state_skeleton
from vermeer_core.phases import PhaseError
from vermeer_core.plugins import Plugins
from vermeer_core.schedule_table import Slot, checkpoint_step, stage_ends, step_table
from vermeer_core.spec import RESUMABLE_CHANGES, RunSpec, dump_spec, spec_changes, spec_hash
from vermeer_core.step import StepResult, TrainStep, make_loss_fn
from vermeer_core.transfer import Transfer, TransferError, check_result

__all__ = ["Engine", "RunError", "RESUMABLE_CHANGES", "spec_changes"]  # the last two: moved to spec, re-exported


class RunError(VermeerError):
    """The run cannot go on; the message says why and what is safe (e.g. the last checkpoint)."""


@dataclass
class _Carry:
    """What survives from one stage (or a checkpoint) into the next: sharded tensors by name,
    and this rank's data position (the next stage's stream starts there)."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optim: OptimState
    ema_age: dict[str, int]
    data: dict[str, Any] | None = None


class Engine:
    def __init__(
        self, spec: RunSpec, plugins: Plugins, out: str, dist_info: DistInfo, *, resume: str = "auto",
        branch: Branch | None = None,
    ) -> None:
        self.spec = spec
        self.branch = branch  # --from: where a run without checkpoints of its own starts
        self.plugins = plugins
        self.registry = plugins.registry
        self.out = out
        self.d = dist_info
        self.resume = resume
        self.rank0 = dist_info.rank == 0
        self.slots = step_table(spec, self.registry)
        self.total = self.slots[-1].end
        pinned = frozenset(stage_ends(self.slots).values()) if spec.train.keep_stage_ends else frozenset()
        self.ckpt = Checkpointer(out, keep=spec.train.keep_checkpoints, rank=dist_info.rank,
                                 world_size=dist_info.world_size, meta_keys=META_KEYS, pinned=pinned)
        self.bf16 = spec.train.precision == "bf16"
        self.schedule = self.registry.build(spec.diffusion.schedule, "noise_schedule")
        self.sampler = self.registry.build(spec.sampling.sampler, "sampler")
        for stage in spec.stages:
            if stage.batch_size % dist_info.world_size:
                raise RunError(
                    f"stage batch_size {stage.batch_size} is not divisible by the world size "
                    f"{dist_info.world_size}; change stages.*.batch_size or --nproc-per-node"
                )
        if spec.eval is not None:
            from vermeer_core.evaluation import check_eval

            check_eval(spec, self.registry, spec.stages[0].resolution)  # fail now, not after training
        self.metrics: MetricsLog | None = None
        self.trained = False  # whether this process ran any step (else no loss plot to redraw)
        # Non-finite steps: skipped in total (logged), in a row (spans phases and stages) and
        # in the current phase; all three are checkpointed, so a resume counts on.
        self.skipped_steps = 0
        self.bad_in_row = 0
        self.phase_skipped = 0
        self._lease: Any = None  # rank 0's Lease while run() runs

    # --- helpers -----------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.metrics is not None:
            self.metrics.message(text)
        elif self.rank0:
            print(text, file=sys.stderr, flush=True)  # messages on stderr, like the progress lines

    def _barrier(self) -> None:
        if self.d.world_size > 1:
            dist.barrier()

    def _stage_model(self, stage: int, carry: _Carry | None, *, fresh: bool = True) -> tuple[nn.Module, EMA]:
        """Build stage ``stage``'s model on the meta device (growing structurally from the
        previous stage replayed on meta: ``prev`` holds no trained values), check its
        transfers, shard it, give each rank its shards on the device, initialise the new
        modules (``fresh``; a resume loads a checkpoint instead), then load the carried tensors
        of every module it reuses and apply its transfers. See :mod:`vermeer_core.meta_init`."""
        prev = replay(self.spec, self.registry, stage - 1, device="meta") if stage > 0 else None
        try:
            built = build_meta_stage(self.spec, self.registry, stage, prev, init=fresh)
            plan = stage_transfers(built.model, prev, stage)  # before any storage or training
        except ValueError as exc:
            raise RunError(f"growth policy {self.spec.stages[stage].growth.type!r}: {exc}") from None
        model: VermeerModel = built.model
        self.plugins.hook.vermeer_stage_start(
            stage=stage, resolution=model.resolution, model=model, run_dir=self.out
        )
        new = model.new_modules

        def reused(name: str) -> bool:
            return not any(name == p or name.startswith(p + ".") for p in new)

        parallelize(
            model,
            self.d.mesh,
            bf16=self.bf16 and self.d.device.type == "cuda",
            activation_checkpointing=self.spec.train.activation_checkpointing,
            compile=self.spec.train.compile,
            **default_fsdp_settings(self.d.device),
        )
        materialize_sharded(built, self.d.device)
        init_ema: dict[str, torch.Tensor] = {}
        ema_age: dict[str, int] = {}
        if carry is not None:
            keep = {k: v for k, v in carry.model.items() if reused(k)}
            names = {n for n, _ in model.named_parameters()} | set(model.state_dict())
            missing = [k for k in names if reused(k) and k not in keep]
            if missing:
                raise RunError(f"stage {stage} reuses {missing[:3]} but the previous stage has no such tensors")
            try:
                moved = _transferred(plan, model, carry, f"stage {stage}: ")
            except TransferError as exc:
                raise RunError(f"growth policy {self.spec.stages[stage].growth.type!r}: {exc}") from None
            set_model_state_dict(model, {**keep, **moved.model}, options=StateDictOptions(strict=False))
            init_ema = {k: v for k, v in carry.ema.items() if reused(k)} | moved.ema
            ema_age = {k: v for k, v in carry.ema_age.items() if reused(k)} | moved.ema_age
            # only parameters this model still has: the state of a discarded module (the
            # Shallow-UViT periphery) would otherwise be saved and then fail to load on resume
            params = {n for n, _ in model.named_parameters()}
            optim = {k: v for k, v in carry.optim.items() if k in params and reused(k) and k not in plan}
            carry.optim = optim | moved.optim
        e = self.spec.ema
        ema = EMA(model, e.decay if e else 0.0, init=init_ema, skip=frozenset(model.always_frozen),
                  power=e.warmup_power if e else 0.0, age=ema_age)
        return model, ema

    def _carry(self, model: nn.Module, ema: EMA, optim: OptimState, data: dict[str, Any] | None = None) -> _Carry:
        return _Carry(get_model_state_dict(model), dict(ema.shadow), dict(optim), dict(ema.age), data)

    # --- checkpoints ----------------------------------------------------------------------------
    def _save(self, step: int, slot: Slot, model: nn.Module, ema: EMA, optim: OptimState, data: Any) -> None:
        state = {"model": get_model_state_dict(model), "ema": ema.shadow, "optim": optim}
        meta = {
            "step": step,
            "stage": slot.stage,
            "phase": slot.index,
            "phase_name": slot.phase.name,
            "step_in_phase": step - slot.start,
            "spec_hash": spec_hash(self.spec),
            "spec": self.spec.model_dump(mode="json"),
            "world_size": self.d.world_size,
            "optim_names": sorted(optim),
            "ema_age": ema.age,
            "bad_in_row": self.bad_in_row,
            "phase_skipped": self.phase_skipped,
            "skipped_steps": self.skipped_steps,
            "time": time.time(),
        }
        self._check_lease()
        if self.metrics is not None:
            self.metrics.flush()  # records up to this checkpoint survive a kill (object stores)
        url = self.ckpt.save(step, state, meta, {"data": data.state_dict(), "stage": slot.stage})
        if self.rank0:
            self.plugins.hook.vermeer_checkpoint_saved(url=url, step=step)
            self._say(f"checkpoint step {step} committed: {url}")

    def _load(self, url: str, model: nn.Module, ema: EMA, names: list[str]) -> OptimState:
        optim = state_skeleton(model, names)
        state = {"model": get_model_state_dict(model), "ema": ema.shadow, "optim": optim}
        self.ckpt.load(url, state)
        set_model_state_dict(model, state["model"])
        return optim

    def _find_resume(self) -> tuple[str, dict[str, Any]] | None:
        """The newest usable committed checkpoint and its meta. Damaged ones (unreadable,
        failing verification, unsafe metadata) are skipped, saying which and why, and rank 0
        marks them REJECTED; when none is usable the run stops naming each and why."""
        done = self.ckpt.committed()
        if not done:
            return None
        rejected: list[tuple[str, str]] = []
        for url in reversed(done):
            reason = self.ckpt.inspect(url, digests=self.spec.train.verify_checkpoints)
            if reason is not None:
                self._say(f"checkpoint {url} cannot be used, skipping it: {reason}")
                rejected.append((url, reason))
                continue
            meta = self.ckpt.read_meta(url)
            refused, allowed = spec_changes(meta["spec"], self.spec.model_dump(mode="json"))
            if refused:
                raise RunError(
                    f"{url} was written under a different spec; changed fields that a resume cannot "
                    f"take: {'; '.join(refused)}. Resume with the original spec ({join(self.out, 'spec.lock.yaml')}), "
                    "or start a new run with another --out"
                )
            if allowed:
                self._say(f"resuming with changed fields (allowed): {', '.join(allowed)}")
            if rejected and self.rank0:
                for bad, why in rejected:
                    self.ckpt.reject(bad, why)
                self.ckpt.write_latest()
                self._say(f"marked {len(rejected)} damaged checkpoint(s) REJECTED (removed by the next save); "
                          f"resuming from the newest usable one, {url}")
            self._barrier()
            return url, meta
        raise RunError(
            f"{self.out} holds no usable checkpoint:\n  " + "\n  ".join(f"{u}: {r}" for u, r in rejected)
            + "\nMove them away (or use another --out) to start over; nothing was changed"
        )

    # --- the lease ---------------------------------------------------------------------------------
    def _agree(self, ok: bool) -> bool:
        """Whether every rank's ``ok`` is true (a MIN all-reduce; rank 0 decides about the lease)."""
        if self.d.world_size == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.d.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _check_lease(self) -> None:
        """Collective, before each checkpoint: rank 0 renews its lease now (besides the heartbeat
        thread, so a process resumed after a long suspension notices before it writes), and
        every rank stops if it was taken over."""
        if self._lease is not None:
            self._lease.renew()
        lost = self._lease is not None and self._lease.lost
        if not self._agree(not lost):
            if self._lease is not None:
                self._lease.check()
            raise RunError(f"rank 0 lost the lease of {self.out}; stopping without writing")

    # --- the run -----------------------------------------------------------------------------------
    def run(self) -> None:
        """Train under the run directory's lease (rank 0 holds it: one writer per ``out``)."""
        from vermeer_core.lease import Lease

        error: VermeerError | None = None
        if self.rank0:
            try:
                self._lease = Lease(self.out, say=self._say)
                self._lease.acquire()
            except VermeerError as exc:  # held by another run, or the storage refused (every rank must hear)
                self._lease, error = None, exc
        if not self._agree(error is None):
            if error is not None:
                raise error
            raise RunError(f"rank 0 could not take the lease of {self.out}; see its message")
        try:
            self._run()
        finally:
            if self._lease is not None:
                self._lease.release()
                self._lease = None

    def _run(self) -> None:
        spec = self.spec
        resume_from = self._find_resume() if self.resume == "auto" else None
        if resume_from is None and self.resume == "never" and self.ckpt.latest() is not None:
            raise RunError(
                f"{self.out} already holds checkpoints; use --resume auto to continue it, or another --out"
            )
        branch = self.branch if resume_from is None else None  # --from starts a run, never resumes one
        if branch is not None:
            resume_from = branch.url, branch.meta
        elif self.branch is not None:
            self._say(f"{self.out} holds checkpoints of its own: resuming from them (--from is used only to start)")
        self._check_lease()  # still ours before the first write
        if self.rank0:
            atomic_write_text(join(self.out, "spec.lock.yaml"), dump_spec(spec))
        start = 0
        url = meta = None
        if resume_from is not None:
            url, meta = resume_from
            start = checkpoint_step(self.slots, meta)
            verb = "resuming" if branch is None else "branching"
            self._say(f"{verb} from step {start} (stage {meta['stage']}, phase {meta['phase_name']}) of {url}")
        if branch is not None and self.rank0:
            copied = copy_history(branch, self.out, self.slots, start, spec)
            self._say(f"copied the parent's history up to step {start}: {', '.join(copied) or 'nothing'}")
        if self.rank0:
            trim_metrics(join(self.out, "metrics.jsonl"), start)
        self.metrics = MetricsLog(join(self.out, "metrics.jsonl") if self.rank0 else None, self.total, start, self.rank0)
        self._barrier()
        first_stage = meta["stage"] if meta else 0
        carry: _Carry | None = None
        try:
            for stage in range(first_stage, len(spec.stages)):
                carry = self._run_stage(stage, start, carry, url if stage == first_stage else None, meta)
        finally:
            self.metrics.close()
        if self.rank0:
            self._plot_losses()
            self.ckpt.write_latest()  # repairs a hint left pointing at a rejected checkpoint
        self._barrier()

    def _run_stage(
        self, stage: int, start: int, carry: _Carry | None, url: str | None, meta: dict[str, Any] | None
    ) -> _Carry:
        spec = self.spec
        st = spec.stages[stage]
        model, ema = self._stage_model(stage, carry, fresh=url is None)
        optim: OptimState = carry.optim if carry is not None else {}
        world, rank = self.d.world_size, self.d.rank
        data = self.registry.build(
            spec.data, "dataset", resolution=st.resolution, batch_size=st.batch_size // world,
            rank=rank, world_size=world, seed=spec.seed,
        )
        if url is not None and meta is not None:
            optim = self._load(url, model, ema, meta["optim_names"])
            ema.age.update({k: v for k, v in meta.get("ema_age", {}).items() if k in ema.age})
            if meta["world_size"] == world:
                rank_state = self.ckpt.read_rank_state(url, rank)
            else:
                # DCP reshards model, EMA and optimizer; a data position is per rank, so every
                # rank starts from rank 0's and the dataset maps it onto its own share.
                rank_state = self.ckpt.read_rank_state(url, 0)
                self._say(
                    f"{url} was written by {meta['world_size']} ranks, this run has {world}: model, EMA and "
                    "optimizer are resharded; data positions restart from rank 0's (the dataset decides how "
                    "exactly it can map them: see its docs)"
                )
            if rank_state is None:
                raise RunError(f"{url} has no data position for rank {rank}: the checkpoint is damaged")
            data.load_state_dict(rank_state["data"])
            self.bad_in_row = int(meta.get("bad_in_row", 0))
            self.phase_skipped = int(meta.get("phase_skipped", 0))
            self.skipped_steps = int(meta.get("skipped_steps", 0))
        elif carry is not None and carry.data is not None:
            # the stream goes on where the previous stage's ended, now at this resolution
            # (its checkpoints then hold this position: resume stays exact)
            data.load_state_dict(carry.data)
        flops = stage_forward_flops(spec, self.registry, stage)
        peak = peak_flops(self.d.device, self.bf16)
        slots = [s for s in self.slots if s.stage == stage]
        it = iter(data)
        for slot in slots:
            if start >= slot.end:
                continue
            self._run_phase(slot, max(start, slot.start), model, ema, optim, data, it, flops, peak)
        end = slots[-1].end
        if start < end:  # else we resumed from this stage's final checkpoint: all done before it
            # samples first, then the stage-boundary checkpoint: a committed stage has its samples
            self._write_samples(stage, model, ema)
            self._write_eval(stage, end, model, ema)
            self._save(end, slots[-1], model, ema, optim, data)
        return self._carry(model, ema, optim, data.state_dict())

    def _run_phase(
        self, slot: Slot, first: int, model: nn.Module, ema: EMA, optim: OptimState, data: Any, it: Any,
        flops: int, peak: float | None,
    ) -> None:
        """Steps ``first``..``slot.end`` of one phase: a loop over :class:`TrainStep`. The host
        reads the device (one read per window, :meth:`_settle`) only at log steps, checkpoints
        and the phase's end."""
        spec, o = self.spec, self.spec.optim
        st = spec.stages[slot.stage]
        try:
            groups = phase_groups(model, slot.phase)
        except PhaseError as exc:
            raise RunError(f"stage {slot.stage}, phase {slot.phase.name!r}: {exc}") from None
        trainable = apply_phase(model, slot.phase)
        opt = build_optimizer(model, groups, optim, lr=o.lr * slot.phase.lr_mult, betas=o.betas, eps=o.eps,
                              weight_decay=o.weight_decay)
        if first == slot.start:
            self.phase_skipped = 0  # a fresh phase (else resumed inside it: restored from the checkpoint)
        stage_end = max(s.end for s in self.slots if s.stage == slot.stage)
        base_lr = o.lr * slot.phase.lr_mult
        train_step = TrainStep(
            model=model, ema=ema, opt=opt, trainable=trainable,
            loss_fn=make_loss_fn(schedule=self.schedule, resolution=st.resolution,
                                 prediction=spec.diffusion.prediction, cond_drop=spec.diffusion.cond_drop,
                                 t_sampling=TSampling(**spec.diffusion.t_sampling.model_dump()),
                                 loss_weight=LossWeight(**spec.diffusion.loss_weight.model_dump())),
            lr_at=lambda step: base_lr * lr_factor(step - slot.start, slot.phase.steps, o.warmup_steps, o.decay),
            first=first, seed=spec.seed, grad_clip=o.grad_clip, device=self.d.device, rank=self.d.rank,
            world_size=self.d.world_size, local_batch=st.batch_size // self.d.world_size,
            autocast_bf16=self.bf16 and self.d.device.type == "cpu",
        )
        pending: list[StepResult] = []
        last: dict[str, Any] = {}
        t_log, imgs = time.perf_counter(), 0
        model.train()
        self.plugins.hook.vermeer_phase_start(stage=slot.stage, phase=slot.phase, step=first,
                                              phase_step=first - slot.start, model=model, optimizer=opt)
        for _ in range(first, slot.end):
            result = train_step(next(it))
            pending.append(result)
            done = result.step
            log = done % spec.train.log_every == 0 or done == slot.end
            save = self._checkpoint_due(done, stage_end)
            if log or save:
                applied, loss, norm = self._settle(pending, slot, ema)
                imgs += st.batch_size * sum(applied)
                pending = []
                if log and applied[-1]:  # a skipped step writes no record
                    dt = time.perf_counter() - t_log
                    ips = imgs / dt if dt > 0 else 0.0
                    achieved = 3 * flops * ips  # forward + backward ~ 3x forward FLOPs
                    last = {
                        "step": done, "stage": slot.stage, "phase": slot.phase.name, "resolution": st.resolution,
                        "loss": loss, "lr": result.lr, **{f"lr/{g.name}": result.lr * g.lr_mult for g in groups},
                        "grad_norm": norm, "images_per_s": ips,
                        "tflops": achieved / 1e12, "mfu": (achieved / self.d.world_size / peak) if peak else None,
                        "mem_bytes": memory_bytes(self.d.device), "skipped_steps": self.skipped_steps,
                        **self._state_bytes(model, opt, optim), "time": time.time(),
                    }
                    stats = getattr(data, "stats", None)  # optional: e.g. skipped corrupt samples by reason
                    if callable(stats):
                        last.update({f"data_{k}": v for k, v in stats().items()})
                    self.metrics.log(last)  # type: ignore[union-attr]
                    t_log, imgs = time.perf_counter(), 0
            if self.metrics:
                self.metrics.advance()
            self.plugins.hook.vermeer_step_end(stage=slot.stage, phase=slot.phase, step=done,
                                               phase_step=done - slot.start, model=model,
                                               metrics=last if last.get("step") == done else None,
                                               skipped=result.skipped)
            # Stage ends are checkpointed by _run_stage, after the stage's samples exist; a
            # skipped step is not checkpointed (the next good checkpoint step will be).
            if save and applied[-1]:
                park_state(opt, optim)
                self._save(done, slot, model, ema, optim, data)
        park_state(opt, optim)
        self.trained = True
        self.plugins.hook.vermeer_phase_end(stage=slot.stage, phase=slot.phase.name, step=slot.end, metrics=last)

    def _checkpoint_due(self, done: int, stage_end: int) -> bool:
        """Whether step ``done`` (1-based) is a checkpoint step of the training loop (every
        ``train.checkpoint_every``; a stage's last step is saved by :meth:`_run_stage`)."""
        return done % self.spec.train.checkpoint_every == 0 and done != stage_end

    def _settle(self, pending: list[StepResult], slot: Slot, ema: EMA) -> tuple[list[bool], float, float]:
        """Read the window of steps since the last read (one host-device sync) and count its
        non-finite steps in order, as if each had been checked when it ran: the counters,
        messages and stop conditions are exact, only noticed late (up to ``log_every - 1``
        steps, which ran and were discarded with the run: no checkpoint is written after the
        step that broke a limit). Returns (applied per step, last loss, last grad norm)."""
        last = pending[-1]
        values = torch.stack([*(r.skipped for r in pending), last.loss, last.grad_norm]).tolist()
        ema.settle()
        skipped = [v > 0 for v in values[:-2]]
        spec = self.spec
        max_skipped = spec.train.max_skipped_fraction * slot.phase.steps
        fix = "Lower optim.lr, raise optim.warmup_steps or enable optim.grad_clip, then resume"
        for r, bad in zip(pending, skipped):
            if not bad:
                self.bad_in_row = 0
                continue
            self.bad_in_row += 1
            self.skipped_steps += 1
            self.phase_skipped += 1
            self._say(f"step {r.step}: non-finite loss/gradient, step skipped ({self.bad_in_row} in a row)")
            late = "" if r.step == last.step else f" (noticed at step {last.step}, when the device was read)"
            if self.bad_in_row >= spec.train.max_bad_steps:
                raise RunError(
                    f"loss was not finite for {self.bad_in_row} steps in a row (stage {slot.stage}, phase "
                    f"{slot.phase.name}, step {r.step}){late}; stopped. Last good checkpoint: "
                    f"{self.ckpt.latest() or 'none'}. {fix}"
                )
            if self.phase_skipped > max_skipped:
                raise RunError(
                    f"phase {slot.phase.name} of stage {slot.stage} skipped {self.phase_skipped} of its "
                    f"{slot.phase.steps} steps as non-finite (step {r.step}){late}, more than "
                    f"train.max_skipped_fraction={spec.train.max_skipped_fraction:g} of them; stopped. "
                    f"Last good checkpoint: {self.ckpt.latest() or 'none'}. {fix}"
                )
        return [not b for b in skipped], values[-2], values[-1]

    def _state_bytes(self, model: nn.Module, opt: torch.optim.Optimizer, optim: OptimState) -> dict[str, int]:
        """Bytes of parameters and of optimizer state (live and parked) held by the largest rank:
        under FSDP each rank holds only its shards, so these fall as 1/world_size."""
        opt_tensors = {id(t): t for s in (*opt.state.values(), *optim.values()) for t in s.values()}
        sizes = torch.tensor([_local_bytes(model.parameters()), _local_bytes(opt_tensors.values())],
                             device=self.d.device)  # NCCL reduces CUDA tensors only
        if self.d.world_size > 1:
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        return {"param_bytes": int(sizes[0]), "optim_bytes": int(sizes[1])}

    # --- outputs -----------------------------------------------------------------------------------
    def _write_samples(self, stage: int, model: nn.Module, ema: EMA) -> None:
        from vermeer_core.sampling import generate, save_grid

        s = self.spec.sampling
        st = self.spec.stages[stage]
        with ema.swapped_in(model):
            images = generate(model, s.prompts, spec=self.spec, schedule=self.schedule, sampler=self.sampler,
                              resolution=st.resolution, device=self.d.device, rank=self.d.rank,
                              world_size=self.d.world_size)
            # FSDP2 keeps the root's parameters (and, without reshard_after_forward, every
            # unit's) unsharded after a forward (it expects a backward); reshard so the EMA
            # swap restores into the sharded parameters.
            reshard_all(model)
        if self.rank0:
            name = f"stage{stage}-{st.resolution}px"
            save_grid(images, s.prompts, join(self.out, "samples", name + ".png"))
            self._say(f"samples: {join(self.out, 'samples', name + '.png')}")
        self._barrier()

    def _write_eval(self, stage: int, step: int, model: nn.Module, ema: EMA) -> None:
        """The spec's ``eval:`` metrics on held-out prompts with the EMA weights: a record in
        metrics.jsonl (``eval/<key>``) and ``eval/stage{k}.json`` + a pass/fail grid PNG."""
        e = self.spec.eval
        if e is None:
            return
        from vermeer_core.evaluation import evaluate, write_result

        st = self.spec.stages[stage]
        with ema.swapped_in(model):
            result = evaluate(
                model, spec=self.spec, registry=self.registry, metrics=e.metrics, n=e.prompts, seed=e.seed,
                resolution=st.resolution, schedule=self.schedule, sampler=self.sampler, device=self.d.device,
                steps=e.steps, guidance=e.guidance, batch_size=e.batch_size, rank0=self.rank0,
                rank=self.d.rank, world_size=self.d.world_size,
            )
            reshard_all(model)  # as in _write_samples: restore the EMA swap into sharded parameters
        if result is not None and self.metrics is not None:
            base = join(self.out, "eval", f"stage{stage}")
            info = {"stage": stage, "step": step, "resolution": st.resolution, "seed": e.seed}
            write_result(result, base + ".json", base + ".png", info)
            self.metrics.log({**info, **{f"eval/{k}": v for k, v in result.metrics.items()},
                              "eval_seconds": sum(result.seconds.values()), "time": time.time()})
            shown = ", ".join(f"{k} {v:.3g}" for k, v in result.metrics.items() if k.count("/") == 0)
            self._say(f"eval stage {stage} ({len(result.prompts)} held-out prompts): {shown} -> {base}.json")
        self._barrier()

    def _plot_losses(self) -> None:
        if not self.trained:
            return
        from vermeer_core.sampling import plot_losses

        plot_losses(join(self.out, "metrics.jsonl"), join(self.out, "loss.png"))


@dataclass
class _Moved:
    """Transferred tensors, placed like the new model's (see :func:`_transferred`)."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    ema_age: dict[str, int]
    optim: OptimState


def _transferred(plan: dict[str, Transfer], model: nn.Module, carry: _Carry, where: str) -> _Moved:
    """Apply a growth policy's transfers (``plan``, resolved and checked) to the carried
    tensors of the previous stage: for each target the weight, the EMA shadow (with its age)
    and the AdamW state, sharded like the target. Copies keep every state; a ``fn`` gets the
    full tensors and its moments start fresh unless the transfer says ``moments``."""
    ref = get_model_state_dict(model)
    params = {n for n, _ in model.named_parameters()}
    frozen = getattr(model, "always_frozen", frozenset())
    out = _Moved({}, {}, {}, {})

    def apply(t: Transfer, key: str, values: list[torch.Tensor]) -> torch.Tensor:
        if t.fn is None:
            return _place(values[0], ref[key])
        value = t.fn(*(_full(v) for v in values))
        check_result(key, t, value, ref[key].shape, where)
        return _place(value, ref[key])

    with torch.no_grad():
        for key, t in plan.items():
            out.model[key] = apply(t, key, [carry.model[s] for s in t.sources])
            if key not in params:
                continue  # a buffer: no EMA, no optimizer state
            if key not in frozen:
                out.ema[key] = apply(t, key, [carry.ema.get(s, carry.model[s]) for s in t.sources])
                out.ema_age[key] = min(carry.ema_age.get(s, 0) for s in t.sources)
            states = [carry.optim.get(s) for s in t.sources]
            if all(st is not None for st in states) and (t.fn is None or t.moments):
                out.optim[key] = {
                    "step": max((st["step"] for st in states), key=float).clone(),  # type: ignore[index]
                    "exp_avg": apply(t, key, [st["exp_avg"] for st in states]),  # type: ignore[index]
                    "exp_avg_sq": apply(t, key, [st["exp_avg_sq"] for st in states]),  # type: ignore[index]
                }
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _place(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A new tensor holding ``value``, sharded (and typed) like ``ref``. Same mesh and
    placements (a copy between equal shapes): a local clone, no communication; otherwise the
    full value, which every rank holds alike, is split locally (``src_data_rank=None``)."""
    if isinstance(ref, DTensor):
        if isinstance(value, DTensor) and value.device_mesh == ref.device_mesh and value.placements == ref.placements:
            return value.to(ref.dtype).clone()
        full = _full(value).to(device=ref.to_local().device, dtype=ref.dtype)
        return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)
    return _full(value).to(device=ref.device, dtype=ref.dtype).clone()


def _local_bytes(tensors: Any) -> int:
    """Bytes this rank stores for ``tensors`` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total
