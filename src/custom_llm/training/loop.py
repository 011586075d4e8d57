"""The outer loop around :meth:`Trainer._train_step`: evaluation, curriculum, logging, saving, stopping.

Order after each optimizer step: evaluate (when due) -> curriculum decision -> metrics row -> save
(when due, or when stopping). Signals: the first SIGINT/SIGTERM lets the current step finish, saves,
and ends the run with exit code 0; a second one exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

from . import curriculum as cur
from .metrics import MetricsWriter

log = logging.getLogger("custom_llm.training")


class TrainingLoop:
    """Drives one :class:`Trainer` from its current step to the end of the run."""

    def __init__(self, trainer):
        self.t = trainer
        self.signal: Optional[int] = None
        self.writer: Optional[MetricsWriter] = None
        self.bar = None
        self.last_saved: Optional[int] = None
        self.last_eval: Optional[int] = None

    # --- signals ------------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum
        log.info("received %s: finishing this step, saving a checkpoint, then stopping (send again to abort)",
                 signal.Signals(signum).name)

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    # --- main loop ------------------------------------------------------------------------------
    def run(self):
        from .trainer import TrainResult, TrainingStopped

        t, tc = self.t, self.t.tc
        previous = self._install_signals()
        self._open_outputs()
        start = time.time()
        stopped = "done"
        self.interval = (time.time(), t.tokens)
        try:
            while t.step < tc.max_steps:
                loss, grad_norm, applied, stop_any = t._train_step(self._wants_stop(start))
                self._after_step(loss, applied)
                if t.bad_run >= tc.max_bad_steps:
                    raise TrainingStopped(
                        f"stopping at step {t.step}: {t.bad_run} consecutive steps had a non-finite loss or gradient "
                        f"(last loss {loss:.4g}, grad norm {grad_norm:.4g}); lower --train.lr or use --precision fp32/bf16")
                if stop_any or (not t.rt.distributed and self._wants_stop(start)):
                    stopped = "signal" if self.signal is not None else "time_limit"
                    break
                if tc.save_every and t.step % tc.save_every == 0:
                    self._save()
            if stopped != "signal" and self.last_eval != t.step:
                self._eval_row()
            if self.last_saved != t.step:
                self._save()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close_outputs()
        val = t.evals[-1]["val_loss"] if t.evals else None
        path = t.run_dir / f"ckpt-{t.step}"
        if stopped != "done":
            log.info("stopped early (%s) at step %d; continue with --resume", stopped, t.step)
        return TrainResult(t.run_dir, t.step, t.tokens, val, path, stopped, t.bad_total)

    def _wants_stop(self, start: float) -> bool:
        limit = self.t.tc.time_limit
        return self.signal is not None or (limit is not None and time.time() - start >= 60 * limit)

    def _after_step(self, loss: float, applied: bool) -> None:
        t, tc = self.t, self.t.tc
        if applied:
            t.bad_run = 0
            t.pending.append(loss)
        else:
            t.bad_total += 1
            t.bad_run += 1
            log.warning("step %d skipped: non-finite loss or gradient (loss %.4g)", t.step, loss)
        row: dict = {}
        if tc.eval_every and t.step % tc.eval_every == 0:
            row.update(self._measure())
        transition = cur.update(t.curriculum, tc.curriculum, t.step, t.tokens, row.get("val_loss"),
                                patience=tc.curriculum_patience, threshold=tc.curriculum_threshold)
        if transition is not None:
            batch, seq_len, factor = t._shape()
            t.loader.set_shape(batch // t.rt.world_size, seq_len)
            row["stage_change"] = {k: transition[k] for k in ("from", "to", "reason")}
            log.info("curriculum: stage %d -> %d at step %d (%s): batch %d, seq_len %d, lr x%.3g",
                     transition["from"], transition["to"], t.step, transition["reason"], batch, seq_len, factor)
        if row or t.step % tc.log_every == 0 or not applied:
            self._write_row(row)
        if self.bar is not None:
            self.bar.update(1)

    def _measure(self) -> dict:
        val = self.t.evaluate()
        self.last_eval = self.t.step
        self.t.evals.append({"step": self.t.step, "tokens": self.t.tokens, "val_loss": val})
        return {"val_loss": val, "val_ppl": _ppl(val)}

    def _eval_row(self) -> None:
        self._write_row(self._measure())

    def _write_row(self, extra: dict) -> None:
        t = self.t
        now = time.time()
        seconds, tokens0 = now - self.interval[0], self.interval[1]
        rate = (t.tokens - tokens0) / seconds if seconds > 0 and t.tokens > tokens0 else None
        self.interval = (now, t.tokens)
        row: dict = {"step": t.step, "tokens": t.tokens, "lr": getattr(t, "_lr", None), "stage": t.curriculum.stage}
        if t.pending:
            row["loss"] = sum(t.pending) / len(t.pending)
            t.pending = []
        if rate is not None:
            row["tokens_per_s"] = rate
            if self.peak:
                row["mfu"] = rate * t.model.flops_per_token(t._shape()[1]) / (self.peak * t.rt.world_size)
        if t.bad_total:
            row["bad_steps"] = t.bad_total
        load = _moe_load(t.model)
        if load:
            row["moe_load"] = load
        row.update(extra)
        if self.writer is not None:
            self.writer.write(row)
        if self.bar is not None:
            self.bar.set_postfix(_postfix(row), refresh=False)

    # --- outputs --------------------------------------------------------------------------------
    def _open_outputs(self) -> None:
        from .distributed import peak_flops

        t = self.t
        self.peak, peak_note = peak_flops(t.rt)
        if not t.rt.is_main:
            return
        resume_step = t.step if t.resumed_from is not None else None
        self.writer = MetricsWriter(t.run_dir, resume_step=resume_step)
        params = t.model.num_params()
        log.info("model: %.2fM parameters (%.2fM active), %s on %s x%d, %s; MFU peak: %s",
                 params["total"] / 1e6, params["active"] / 1e6, t.rt.precision, t.rt.device.type,
                 t.rt.world_size, "torch.compile" if t.compiled else "eager", peak_note)
        if t.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=t.tc.max_steps, initial=t.step, unit="step", dynamic_ncols=True, desc="train")

    def _close_outputs(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def _save(self) -> None:
        self.t.save()
        self.last_saved = self.t.step


def _ppl(loss: float) -> float:
    import math

    return math.exp(min(loss, 50.0))


def _moe_load(model) -> list[list[float]]:
    """Per MoE layer, the fraction of routed tokens each expert received in the last forward."""
    loads = []
    for block in model.layers:
        load = getattr(block.mlp, "expert_load", None)
        if load is not None:
            loads.append([round(float(v), 4) for v in load.tolist()])
    return loads


def _postfix(row: dict) -> dict:
    shown = {}
    if "loss" in row:
        shown["loss"] = f"{row['loss']:.3f}"
    if "val_loss" in row:
        shown["val"] = f"{row['val_loss']:.3f}"
    if row.get("lr") is not None:
        shown["lr"] = f"{row['lr']:.2e}"
    if "tokens_per_s" in row:
        shown["tok/s"] = f"{row['tokens_per_s']:.0f}"
    if "mfu" in row:
        shown["mfu"] = f"{100 * row['mfu']:.1f}%"
    return shown
