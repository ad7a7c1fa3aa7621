"""The boundary between the parties: what the passive party computes, and what crosses.

:class:`PassiveParty` is the publisher's side of every stage: its encoded rows, its
tower and that tower's optimizer. It answers exactly three kinds of request: embed these
rows, take a step with these gradients, and bookkeeping (phase, best snapshot,
checkpoint). The in-process simulation calls it directly; in a two-party run the
passive process serves the same object over the wire (``vfl.protocol``), so both modes
run the same arithmetic.

:class:`PassiveLink` is the active party's view of that boundary. It turns each
embedding it receives into a leaf tensor, so the active party's backward pass stops at
``h_B`` and yields exactly the gradients that are sent back, applies the optional
protection, and counts what crosses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import torch

from kedit_vfl.errors import UserError
from kedit_vfl.vfl.config import Protection
from kedit_vfl.vfl.data.encoding import Party
from kedit_vfl.vfl.models.networks import ServingTower, Tower
from kedit_vfl.vfl.privacy.leakage import CalibratedNoise, GradientRecorder
from kedit_vfl.vfl.stages.checkpoint import CheckpointStore, Tag
from kedit_vfl.vfl.stages.train import FlatAdamW, single_thread

KEY_DTYPE = torch.int64  # rows are addressed by a key: overlap position, or an alignment's key
EMBEDDING_DTYPE = torch.float32
EVAL_SLICE = 8192  # rows per embedding request when nothing trains


def passive_seed(seed: int) -> int:
    """The passive party's own stream, distinct from the active party's ``seed``."""
    return (seed * 1_000_003 + 7919) % (2**63)


def warm_up_autograd() -> None:
    """Pay PyTorch's one-off set-up for a backward pass from an explicit gradient (about
    half a second in a fresh process, the kind of backward the passive party runs each
    step) before the parties connect, not inside the first training step."""
    x = torch.zeros(2, 2, requires_grad=True)
    torch.autograd.backward([x * 1.0], [torch.ones(2, 2)])


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each row of ``x`` (B, d) down to L2 norm at most ``max_norm`` (0: unchanged)."""
    if max_norm <= 0 or x.numel() == 0:
        return x
    norms = x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (B, 1)
    return x * (max_norm / norms).clamp(max=1.0)


def add_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    if std <= 0 or x.numel() == 0:
        return x
    return x + std * torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)


class Endpoint(Protocol):
    """The passive party as the active party sees it, local or over the wire."""

    width: int

    def embed(self, keys: torch.Tensor, train: bool) -> torch.Tensor: ...
    def step(self, grads: list[torch.Tensor]) -> None: ...
    def phase(self, index: int) -> None: ...
    def snapshot(self) -> None: ...
    def restore(self) -> None: ...
    def checkpoint(self, tag: Tag) -> None: ...
    def finish(self) -> None: ...


@dataclass
class PassiveTraining:
    """How the passive party trains its tower, per phase (the same table on both sides)."""

    phase_lrs: tuple[float, ...] = ()  # learning rate of the tower in phase 0, 1, ...
    weight_decay: float = 0.0


class PassiveParty:
    """The publisher: its encoded rows, its tower, its optimizer; answers requests."""

    def __init__(
        self,
        rows: Party,
        overlap_rows: torch.Tensor,
        tower: Tower,
        seed: int,
        protection: Protection = Protection(),
        training: PassiveTraining = PassiveTraining(),
        checkpoints: CheckpointStore | None = None,
        device: torch.device = torch.device("cpu"),
        keys: torch.Tensor | None = None,
    ) -> None:
        self.num, self.cat = rows.num.to(device), rows.cat.to(device)
        self.overlap_rows = overlap_rows.to(device)  # (N,) own row of each overlap position, or of each key
        # (N,) the ascending wire keys of an alignment, or None when keys are the positions
        self.keys = keys.to(device) if keys is not None else None
        self.tower = tower.to(device)
        # a party that never trains (serving embeddings to score) runs the cheaper serving form
        self.serving = ServingTower(self.tower) if not training.phase_lrs else None
        self.generator = torch.Generator(device=device).manual_seed(passive_seed(seed))
        self.tower.use_generator(self.generator)
        self.protection, self.training = protection, training
        self.checkpoints, self.device = checkpoints, device
        self.width = int(tower.mlp[-1].out_features)
        self.optimizer: FlatAdamW | None = None
        self.phase_index = -1
        self.pending: list[torch.Tensor] = []
        self.pending_positions: list[torch.Tensor] = []  # overlap positions of each pending batch
        self.best: dict[str, torch.Tensor] | None = None
        self.rows_embedded = 0
        self.ids = rows.ids
        # --record-received: what arrives, per overlap position, kept for ``kvtool vfl audit``
        self.recorder: GradientRecorder | None = None

    def positions_of(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Overlap positions of the requested keys, and whether each is in the agreement."""
        keys = keys.to(self.device, torch.long)
        if self.keys is not None:  # an alignment's keys: find each in the sorted table
            index = torch.searchsorted(self.keys, keys).clamp_max(max(len(self.keys) - 1, 0))
            agreed = self.keys[index] == keys if len(self.keys) else torch.zeros_like(keys, dtype=torch.bool)
            return index, agreed
        agreed = (keys >= 0) & (keys < len(self.overlap_rows))
        return keys.clamp(0, max(len(self.overlap_rows) - 1, 0)), agreed

    def ids_at(self, positions: torch.Tensor) -> pa.ChunkedArray:
        """This party's user ids at these overlap positions."""
        rows = self.overlap_rows[positions.to(self.device)].cpu().numpy()
        return self.ids.take(pa.array(rows))

    def embed(self, keys: torch.Tensor, train: bool, attached: bool = False) -> torch.Tensor:
        """Embeddings of the rows with these keys. Training ones are remembered for the
        next :meth:`step`; with ``attached`` (in one process) they stay in the autograd
        graph, so the caller's backward pass reaches the tower directly."""
        with single_thread():  # as in the training loop: the same arithmetic in every deployment
            return self._embed(keys, train, attached)

    def _embed(self, keys: torch.Tensor, train: bool, attached: bool = False) -> torch.Tensor:
        keys, agreed = self.positions_of(keys)
        outside = keys.numel() > 0 and not bool(agreed.all())
        if outside and train:
            raise UserError("the active party asked to train on a row outside the agreed overlap")
        rows = self.overlap_rows[keys]
        self._mode(train)
        if not train:
            # A row outside the agreement gets zeros, whether this party holds the user or
            # not: the answer says nothing about its users beyond the agreed overlap.
            self.rows_embedded += int(agreed.sum())
            with torch.no_grad():
                tower = self.serving if self.serving is not None else self.tower
                out = clip_rows(tower(self.num[rows], self.cat[rows]), self.protection.clip)
            return out.masked_fill(~agreed.unsqueeze(1), 0.0) if outside else out
        self.rows_embedded += len(rows)
        h = clip_rows(self.tower(self.num[rows], self.cat[rows]), self.protection.clip)
        if attached:
            return add_noise(h, self.protection.embedding_noise, self.generator)
        self.pending.append(h)
        self.pending_positions.append(keys.cpu())
        return add_noise(h.detach(), self.protection.embedding_noise, self.generator)

    def _mode(self, train: bool) -> None:
        """Switch train/eval only on a change: walking the modules costs more than a small forward."""
        if self.tower.training != train:
            self.tower.train(train)

    def step(self, grads: list[torch.Tensor]) -> None:
        if len(grads) != len(self.pending):
            raise UserError(f"expected {len(self.pending)} gradients, got {len(grads)}")
        if self.optimizer is None:
            raise UserError("a training step arrived before a training phase began")
        with single_thread():
            self.optimizer.zero_grad()
            if self.pending:
                torch.autograd.backward(self.pending, [g.to(self.device) for g in grads])
            self.optimizer.step()
        if self.recorder is not None:
            for positions, grad in zip(self.pending_positions, grads, strict=True):
                self.recorder.add(positions, grad)
        self.pending, self.pending_positions = [], []

    def step_attached(self) -> None:
        """The step after a backward pass that already reached the tower (in one process)."""
        if self.optimizer is None:
            raise UserError("a training step arrived before a training phase began")
        with single_thread():
            self.optimizer.step()
            self.optimizer.zero_grad()

    def phase(self, index: int) -> None:
        """Start training phase ``index`` (a fresh optimizer); a no-op if already in it."""
        if index == self.phase_index:
            return
        if not 0 <= index < len(self.training.phase_lrs):
            raise UserError(f"phase {index} is not part of this run's plan")
        lr = self.training.phase_lrs[index]
        self.optimizer = FlatAdamW(
            [{"params": list(self.tower.parameters())}], lr=lr, weight_decay=self.training.weight_decay
        )
        self.phase_index = index

    def snapshot(self) -> None:
        self.best = {k: v.detach().clone() for k, v in self.tower.state_dict().items()}

    def restore(self) -> None:
        if self.best is not None:
            self.tower.load_state_dict(self.best)
            self._refresh_serving()
        self._mode(False)

    def _refresh_serving(self) -> None:
        """The serving form is a snapshot of the tower's weights: rebuilt when they are loaded."""
        if self.serving is not None:
            self.serving = ServingTower(self.tower)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tower": copy.deepcopy(self.tower.state_dict()),
            "phase": self.phase_index,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "generator": self.generator.get_state(),
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tower.load_state_dict(state["tower"])
        self._refresh_serving()
        self.phase_index = -1
        if state["phase"] >= 0:
            self.phase(state["phase"])
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.best = state["best"]

    def checkpoint(self, tag: Tag) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(tag, self.state_dict())

    def resume(self, tag: Tag) -> None:
        assert self.checkpoints is not None
        self.checkpoints.restore(tag, self.load_state_dict)

    def finish(self) -> None:
        self._mode(False)


HEADER_BYTES = 32  # one request header: four int64


@dataclass
class Traffic:
    """What crosses, by payload and request headers: training requests (row keys and
    gradients one way, embeddings back) apart from evaluation and scoring requests."""

    key_bytes: int = KEY_DTYPE.itemsize
    width: int = 0
    train_to_passive: int = 0
    train_to_active: int = 0
    eval_to_passive: int = 0
    eval_to_active: int = 0
    rows_trained: int = 0
    rows_scored: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)
    _mark: dict[str, int] = field(default_factory=dict)

    def _counters(self) -> dict[str, int]:
        names = ("train_to_passive", "train_to_active", "eval_to_passive", "eval_to_active", "rows_trained")
        return {name: getattr(self, name) for name in names}

    def end_epoch(self, label: str) -> None:
        now = self._counters()
        self.epochs.append({"epoch": label, **{k: v - self._mark.get(k, 0) for k, v in now.items()}})
        self._mark = now

    def summary(self) -> dict[str, Any]:
        floor = 2 * self.width * EMBEDDING_DTYPE.itemsize + self.key_bytes
        train = self.train_to_passive + self.train_to_active
        everything = train + self.eval_to_passive + self.eval_to_active
        rows = max(self.rows_trained, 1)
        return {
            "bytes_to_passive": self.train_to_passive + self.eval_to_passive,
            "bytes_to_active": self.train_to_active + self.eval_to_active,
            "rows_trained": self.rows_trained,
            "rows_scored": self.rows_scored,
            "bytes_per_trained_row": round(train / rows, 2) if self.rows_trained else None,
            "bytes_per_trained_row_with_evaluation": round(everything / rows, 2)
            if self.rows_trained
            else None,
            "floor_bytes_per_row": floor,
            "epochs": self.epochs,
        }


class PassiveLink:
    """The active party's side of the boundary (see the module docstring)."""

    def __init__(
        self,
        endpoint: Endpoint,
        protection: Protection,
        seed: int,
        device: torch.device,
        wire_keys: torch.Tensor | None = None,
    ) -> None:
        self.endpoint, self.protection, self.device = endpoint, protection, device
        self.wire_keys = wire_keys  # (N_overlap,) key sent for each overlap position; None: the position
        self.generator = torch.Generator(device=device).manual_seed(seed + 104_729)
        self.pending: list[torch.Tensor] = []
        self.pending_positions: list[torch.Tensor] = []
        self.attached_rows = 0  # rows embedded since the last step, still in the autograd graph
        self.traffic = Traffic(width=endpoint.width)
        self.recorder: GradientRecorder | None = None  # the leakage audit: what the publisher receives
        self.calibrated: CalibratedNoise | None = None  # the calibrated gradient perturbation

    @property
    def width(self) -> int:
        return self.endpoint.width

    def embed(self, keys: torch.Tensor, train: bool) -> torch.Tensor:
        """``h_B`` (B, d) for overlap positions ``keys``; with ``train``, a leaf whose
        gradient the next :meth:`step` sends back."""
        if not train and len(keys) > EVAL_SLICE:  # bounded messages for large evaluations
            return torch.cat([self.embed(part, False) for part in keys.split(EVAL_SLICE)])
        positions = keys
        if self.wire_keys is not None:
            keys = self.wire_keys[keys.cpu().long()]
        keys = keys.to(KEY_DTYPE)
        attached = train and isinstance(self.endpoint, PassiveParty)
        h = self.endpoint.embed(keys, train, attached=True) if attached else self.endpoint.embed(keys, train)
        h = h.to(self.device)
        n, traffic = len(keys), self.traffic
        request, answer = HEADER_BYTES + n * KEY_DTYPE.itemsize, n * self.width * EMBEDDING_DTYPE.itemsize
        if not train:
            traffic.eval_to_passive, traffic.eval_to_active = (
                traffic.eval_to_passive + request,
                traffic.eval_to_active + answer,
            )
            traffic.rows_scored += n
            return h
        traffic.train_to_passive, traffic.train_to_active = (
            traffic.train_to_passive + request,
            traffic.train_to_active + answer,
        )
        traffic.rows_trained += n
        if attached:  # in one process the backward pass goes on into the tower; same gradients
            if self.protection.clip > 0 or self.protection.gradient_noise > 0 or self.calibrated is not None:
                h.register_hook(self._protect)
            if self.recorder is not None:  # after the protection: it sees what would be sent
                recorder = self.recorder
                h.register_hook(lambda grad, at=positions: recorder.add(at, grad))
            self.attached_rows += n
            return h
        h = h.detach().requires_grad_(True)
        self.pending.append(h)
        self.pending_positions.append(positions)
        return h

    def step(self) -> None:
        """Send the gradients of the embeddings used since the last step; the passive
        party backpropagates them through its tower and steps its optimizer."""
        self.traffic.train_to_passive += HEADER_BYTES
        if isinstance(self.endpoint, PassiveParty):  # gradients already reached the tower
            self.traffic.train_to_passive += self.attached_rows * self.width * EMBEDDING_DTYPE.itemsize
            self.attached_rows = 0
            self.endpoint.step_attached()
            return
        grads = []
        for h, positions in zip(self.pending, self.pending_positions, strict=True):
            grad = h.grad if h.grad is not None else torch.zeros_like(h)
            grads.append(self._protect(grad))
            if self.recorder is not None:
                self.recorder.add(positions, grads[-1])
            self.traffic.train_to_passive += grad.numel() * EMBEDDING_DTYPE.itemsize
        self.pending, self.pending_positions = [], []
        self.endpoint.step(grads)

    def _protect(self, grad: torch.Tensor) -> torch.Tensor:
        p = self.protection
        if p.clip <= 0 and p.gradient_noise <= 0 and self.calibrated is None:
            return grad
        rows = len(grad)  # per-row gradients of the batch-mean loss are 1/B of each row's own
        own = add_noise(clip_rows(grad * rows, p.clip), p.gradient_noise, self.generator)
        if self.calibrated is not None:
            own = self.calibrated(own)
        return own / rows

    def phase(self, index: int) -> None:
        self.endpoint.phase(index)

    def snapshot(self) -> None:
        self.endpoint.snapshot()

    def restore(self) -> None:
        self.endpoint.restore()

    def checkpoint(self, tag: Tag) -> None:
        self.endpoint.checkpoint(tag)

    def end_epoch(self, label: str) -> None:
        self.traffic.end_epoch(label)

    def finish(self) -> None:
        self.endpoint.finish()
