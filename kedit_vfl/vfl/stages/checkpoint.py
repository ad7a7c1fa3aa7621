"""Per-epoch training checkpoints, so that a run cut short continues where it stopped.

Each party keeps its own checkpoints next to its output (``OUT.checkpoints/``), tagged
``(phase, epoch)``; two parties resume from the latest tag both hold. A checkpoint holds
everything the rest of the run depends on (weights, optimizer moments, every random
generator, the loop's bookkeeping), so a resumed run ends exactly where an
uninterrupted one would. Checkpoints are safetensors files with their structure as JSON
(:mod:`kedit_vfl.statefile`), never pickle: a planted file cannot run code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

from kedit_vfl.artifacts import atomic_write
from kedit_vfl.errors import UserError
from kedit_vfl.statefile import StateFileError, load_state, save_state

Tag = tuple[int, int]
T = TypeVar("T")
_NAME = re.compile(r"^phase(\d+)-epoch(\d+)\.safetensors$")


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoints")


class CheckpointStore:
    """The last few checkpoints of one party's run, written atomically."""

    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.directory, self.keep = directory, keep

    def tags(self) -> list[Tag]:
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted((int(m[1]), int(m[2])) for m in found if m)

    def _path(self, tag: Tag) -> Path:
        return self.directory / f"phase{tag[0]}-epoch{tag[1]:04d}.safetensors"

    def save(self, tag: Tag, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        save_state(self._path(tag), state, atomic_write)
        for old in self.tags()[: -self.keep]:
            self._path(old).unlink(missing_ok=True)

    def load(self, tag: Tag) -> dict[str, Any]:
        path = self._path(tag)
        try:
            state = load_state(path)
        except StateFileError as exc:
            raise UserError(
                f"{path}: cannot read this checkpoint ({exc}); start again without --resume"
            ) from exc
        if not isinstance(state, dict):
            raise UserError(f"{path}: not a training checkpoint; start again without --resume")
        return state

    @contextmanager
    def fitting(self, tag: Tag) -> Iterator[None]:
        """Around restoring checkpoint ``tag``: a state that does not fit this run (a key
        missing, a wrong shape or type) is the file's fault, told in one line, not a bug."""
        try:
            yield
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
            detail = (str(exc).splitlines() or [""])[0][:160]
            raise UserError(
                f"{self._path(tag)}: this checkpoint does not fit this run ({type(exc).__name__}: "
                f"{detail}); start again without --resume"
            ) from exc

    def restore(self, tag: Tag, apply: Callable[[dict[str, Any]], T]) -> T:
        """Load checkpoint ``tag`` and hand it to ``apply`` (a ``load_state_dict``)."""
        state = self.load(tag)
        with self.fitting(tag):
            return apply(state)

    def clear(self) -> None:
        for tag in self.tags():
            self._path(tag).unlink(missing_ok=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()


def latest_common(mine: list[Tag], theirs: list[Tag]) -> Tag | None:
    common = sorted(set(mine) & set(theirs))
    return common[-1] if common else None


class TrainingState:
    """The active side's resumable state across a stage's training phases.

    Objects with ``state_dict``/``load_state_dict`` (model, optimizer) are registered as
    a phase sets them up; the torch generator, the given generators and ``extra`` (data a
    later phase needs, like soft targets) are saved with them. With ``resume_from`` the
    checkpoint is read at once, so ``extra`` is there before the phases run again.
    """

    def __init__(
        self,
        store: CheckpointStore | None,
        generators: dict[str, torch.Generator],
        resume_from: Tag | None = None,
    ) -> None:
        self.store, self.generators, self.resume_from = store, generators, resume_from
        self.objects: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self._loaded: dict[str, Any] | None = None
        if resume_from is not None:
            assert store is not None
            self._loaded = store.load(resume_from)
            with store.fitting(resume_from):
                self.extra = dict(self._loaded["extra"])

    def register(self, name: str, obj: Any) -> None:
        self.objects[name] = obj

    def fitting(self) -> AbstractContextManager[None]:
        """Around reading what the resumed checkpoint's ``extra`` holds: one line if it does not fit."""
        if self.store is None or self.resume_from is None:
            return nullcontext()
        return self.store.fitting(self.resume_from)

    def skip(self, phase: int) -> bool:
        """Whether ``phase`` finished before the checkpoint being resumed."""
        return self.resume_from is not None and self.resume_from[0] > phase

    def resume(self, phase: int, like: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Restore everything if the resumed checkpoint is in ``phase``; its loop state
        (refused unless it has the same keys as ``like``, the loop state a fresh phase has)."""
        if self._loaded is None or self.resume_from is None or self.resume_from[0] != phase:
            return None
        state, self._loaded = self._loaded, None
        assert self.store is not None
        with self.store.fitting(self.resume_from):
            for name, obj in self.objects.items():
                obj.load_state_dict(state["objects"][name])
            torch.set_rng_state(state["torch_rng"])
            for name, generator in self.generators.items():
                generator.set_state(state["generators"][name])
            loop = state["loop"]
            if not isinstance(loop, dict) or (like is not None and set(loop) != set(like)):
                raise KeyError("the loop state has other fields than this run keeps")
            return loop

    def save(self, tag: Tag, loop: dict[str, Any]) -> None:
        if self.store is None:
            return
        self.store.save(
            tag,
            {
                "objects": {name: obj.state_dict() for name, obj in self.objects.items()},
                "torch_rng": torch.get_rng_state(),
                "generators": {name: g.get_state() for name, g in self.generators.items()},
                "extra": self.extra,
                "loop": loop,
            },
        )
