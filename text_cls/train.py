"""Fine-tuning: the float ANN, then DA-QCFS-aware (sites in ``quant`` mode, straight-through floor).

Training goes through ``accelerate``: one process on CPU or one GPU as is, several GPUs with
``accelerate launch -m text_cls ...`` (batches are sharded across processes; only the main
process evaluates and writes). Optimizer: AdamW with a linear decay after a short warmup.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from spike_modules.site import iter_sites, set_mode, set_timesteps

from .batching import Encoded, train_batches


def progress_bar(disable: bool = False) -> Progress:
    """The rich progress bar every long loop of text_cls shows (on stderr, removed when done)."""
    from rich.console import Console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=disable, transient=True)


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over samples of KL(teacher || student) between the classes' softmax of the logits over
    ``temperature`` (in nats)."""
    return nn.functional.kl_div((student / temperature).log_softmax(-1), (teacher / temperature).log_softmax(-1),
                                log_target=True, reduction="batchmean")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, weight: float,
                 temperature: float = 1.0) -> torch.Tensor:
    """``(1 - weight) CE(student, labels) + weight tau^2 KL(teacher || student)``, the KL divergence between
    the classes' softmax of the logits over ``temperature`` (tau; the tau^2 keeps its gradients' scale)."""
    ce = nn.functional.cross_entropy(student, labels)
    return (1 - weight) * ce + weight * temperature ** 2 * kl_divergence(student, teacher, temperature)


def finetune_(model: nn.Module, data: Encoded, *, epochs: int, batch_size: int, lr: float, seed: int,
              accelerator, timesteps: tuple[int, ...] | None = None, freeze_embeddings: bool = True,
              desc: str = "fine-tune", progress: bool = True, distill: float = 0.0,
              teacher: nn.Module | None = None, float_loss: float = 0.0,
              thresholds: dict | None = None, score: Callable[[], float] | None = None,
              hidden_distill: float = 0.0, temperature: float = 1.0) -> dict:
    """Train ``model`` in place on ``data`` for ``epochs``; returns a summary (losses, seconds).

    Args:
        model: a classifier (float, or converted with calibrated sites).
        timesteps: ``None`` trains the float model; otherwise the sites run in ``quant`` mode
            (QCFS with a straight-through floor) and each batch uses the next T of this cycle,
            so one model learns to live with every T it will be evaluated at (a T given twice
            gets twice the steps).
        freeze_embeddings: keep the word embeddings fixed (most of MiniLM's parameters; the
            optimizer step then costs a third as much, and the vocabulary the tweets do not use
            stays as pretrained).
        accelerator: an ``accelerate.Accelerator`` (device, and sharding under ``accelerate launch``).
        distill: weight of the distillation term (DA-QCFS phase): the loss is ``(1 - distill)`` times
            the cross-entropy plus ``distill`` times the KL divergence from the float ANN's logits on the
            same batch, so the quantized network learns to answer as the float one does (its errors
            included), not only to fit the labels.
        temperature: the distillation's softmax temperature (1: the logits as they are; higher
            weighs the teacher's ranking of the unlikely classes more).
        teacher: the float ANN; ``None`` means ``model`` itself with its sites off (the same weights
            run as a float network, the default reference), computed without gradients.
        float_loss: weight of a second term (DA-QCFS phase, ``teacher`` None): the cross-entropy of
            the same batch through the float network (sites off, dropout on, with gradients), so the
            shared weights keep learning the labels as a float network while the quantized pass
            follows it through ``distill``. 0 (default): off.
        hidden_distill: weight of a layer-wise term (DA-QCFS phase): the mean over the encoder's layers of
            the relative squared error of the quantized network's hidden states against the float
            ANN's on the batch's tokens, so every layer follows the float one, not only the logits.
            0 (default): off.
        thresholds: per T of ``timesteps``, a ``Calibration`` applied to the sites whenever the cycle
            moves to that T (thresholds fitted for it); ``None``: the sites keep the parameters they have.
        score: called after every epoch (model in eval mode); the weights of the best-scoring epoch are
            kept, and training stops at the first epoch that does not improve on the best (early
            stopping). ``None``: every epoch runs and the last weights stay.
    """
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {distill}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if hidden_distill < 0.0:
        raise ValueError(f"hidden_distill must be >= 0, got {hidden_distill}")
    if float_loss < 0.0:
        raise ValueError(f"float_loss must be >= 0, got {float_loss}")
    if thresholds is not None and (timesteps is None or set(timesteps) - set(thresholds)):
        raise ValueError("thresholds must hold a calibration for every T of timesteps")
    if float_loss and teacher is not None:
        raise ValueError("float_loss trains the float network that shares the quantized one's weights; with a "
                         "separate teacher (--ann_epochs) that network is not the reference: use one or the other")
    word = model.get_input_embeddings()
    params = [p for p in model.parameters() if p.requires_grad and not (freeze_embeddings and p is word.weight)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    epoch_batches = [train_batches(data, batch_size, gen) for _ in range(epochs)]
    steps = math.ceil(sum(len(b) for b in epoch_batches) / accelerator.num_processes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps, max(1, steps // 20)))
    # the scheduler stays unprepared: it steps once per optimizer step of this process
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if timesteps is not None:
        set_mode(model, "quant")
    cycle = itertools.cycle(timesteps or (None,))
    losses, t0 = [], time.perf_counter()
    scores, best = [], None
    wrapped.train()
    try:
        with progress_bar(not progress or not accelerator.is_main_process) as bar:
            task = bar.add_task(desc, total=steps, info="")
            for epoch, batches in enumerate(epoch_batches):
                for i, batch in enumerate(batches):
                    if i % accelerator.num_processes != accelerator.process_index:
                        continue  # under accelerate launch each process takes every n-th batch
                    T = next(cycle)
                    if T is not None and thresholds is not None:
                        thresholds[T].apply_to(model)
                    elif T is not None:
                        set_timesteps(model, T)
                    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                    if (distill or hidden_distill) and timesteps is not None:
                        want = {"output_hidden_states": True} if hidden_distill else {}
                        target = _teacher_out(model, teacher, batch, want)
                        out = wrapped(**batch, **want)
                        loss = distill_loss(out.logits, target.logits, batch["labels"], distill, temperature)
                        if hidden_distill:
                            loss = loss + hidden_distill * hidden_loss(out.hidden_states, target.hidden_states,
                                                                       batch["attention_mask"])
                    else:
                        loss = wrapped(**batch).loss
                    if float_loss and timesteps is not None:
                        loss = loss + float_loss * _float_pass_loss(model, wrapped, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{desc}: the loss became {float(loss)} at epoch {epoch + 1}, "
                                                 f"batch {i + 1}; lower --learning_rate")
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    recent = losses[-20:]
                    bar.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {sum(recent) / len(recent):.3f}")
                if score is not None:
                    scores.append(_score(model, wrapped, score, timesteps))
                    if best is None or scores[-1] > best[0]:
                        best = (scores[-1], epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
                    elif epoch < epochs - 1:
                        break  # no better than the best epoch: stop
        if best is not None and best[1] != len(scores) - 1:
            model.load_state_dict(best[2])
    finally:
        wrapped.eval()
        if timesteps is not None:
            set_mode(model, "ann")
    n = len(losses)
    return {"epochs": epochs, "distill": distill if timesteps is not None else 0.0,
            "temperature": temperature if timesteps is not None and distill else None,
            "hidden_distill": hidden_distill if timesteps is not None else 0.0,
            "float_loss": float_loss if timesteps is not None else 0.0, "steps": n, "samples": len(data), "batch_size": batch_size, "lr": lr,
            "timesteps": list(timesteps) if timesteps else None,
            "thresholds": ({str(T): c.config.rule for T, c in thresholds.items()} if thresholds else "shared"), "freeze_embeddings": freeze_embeddings,
            "first_loss": sum(losses[:10]) / min(10, n) if n else None,
            "last_loss": sum(losses[-10:]) / min(10, n) if n else None,
            "seconds": time.perf_counter() - t0, "sites": sum(1 for _ in iter_sites(model)),
            "epoch_scores": scores, "epochs_run": len(scores) if scores else epochs,
            "epoch_kept": best[1] + 1 if best is not None else epochs}


def _score(model: nn.Module, wrapped: nn.Module, score: Callable[[], float], timesteps) -> float:
    """``score()`` with the model in eval mode (sites as they were), then back to training."""
    wrapped.eval()
    try:
        return float(score())
    finally:
        if timesteps is not None:
            set_mode(model, "quant")
        wrapped.train()


def _float_pass_loss(model: nn.Module, wrapped: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of ``batch`` through ``model`` with its sites off (training mode, with gradients)."""
    set_mode(model, "ann")
    try:
        return wrapped(**batch).loss
    finally:
        set_mode(model, "quant")


def hidden_loss(student: tuple, teacher: tuple, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the layers after the embeddings of ``|h_s - h_t|^2 / |h_t|^2`` on the unmasked tokens."""
    m = mask.unsqueeze(-1).to(student[-1].dtype)
    terms = [((s - t).pow(2) * m).sum() / (t.pow(2) * m).sum().clamp_min(1e-12)
             for s, t in zip(student[1:], teacher[1:], strict=True)]
    return torch.stack(terms).mean()


@torch.no_grad()
def _teacher_out(model: nn.Module, teacher: nn.Module | None, batch: dict, want: dict):
    """The float ANN's outputs on ``batch`` (dropout off): ``teacher``'s, or ``model``'s with its sites off."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if teacher is not None:
        return teacher.eval()(**inputs, **want)
    model.eval()
    set_mode(model, "ann")
    try:
        return model(**inputs, **want)
    finally:
        set_mode(model, "quant")
        model.train()
