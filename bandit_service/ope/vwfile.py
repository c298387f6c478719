"""A VW configuration as a streaming target: VW's own C++ driver learns the log in order.

Progressive validation (Blum, Kalai & Langford, "Beating the hold-out", COLT 1999), as
Personalizer's offline evaluation ran it: the pmf each row gets is the model's prediction
*before* it learns that row. Going through pyvw one row at a time (predict, then learn)
costs ~0.4 ms a row in Python; VW's driver does the same in C++ at ~80,000 rows/s. So the
rows are rendered exactly as the service renders them (:mod:`bandit_service.learners.
vw_text`, the same labels and seed as :class:`~bandit_service.learners.vw.VWLearner`) and
piped to a child process running VW on ``-d /dev/stdin -p /dev/stdout``; a thread reads
the printed pmfs (``action:probability,...`` per row, ranked) back into a temporary file
of float64 per flattened candidate, which the evaluation pass then reads chunk by chunk.
Rendering in this process and learning in the child use two cores; memory stays bounded.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import IO

import numpy as np
import orjson

from bandit_service.learners import vw_text
from bandit_service.learners.vw import cost_from_reward, workspace_args
from bandit_service.ope.stream import Chunk, RowFeatures, Source

_CHILD = """
import sys, vowpalwabbit
ws = vowpalwabbit.Workspace(sys.argv[1] + " -d /dev/stdin -p /dev/stdout")
ws.run_parser()
ws.finish()
"""


class ProgressiveVWTarget:
    def __init__(self, vw_args: str) -> None:
        self.vw_args = vw_args
        self._file: IO[bytes] | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None

    def prepare(self, source: Source, progress: Callable[[str, int], None] | None = None) -> None:
        """Run VW over the whole log once; the pmfs land in a temporary file."""
        self.close()
        self._directory = tempfile.TemporaryDirectory(prefix="bandit-ope-vw-")
        path = os.path.join(self._directory.name, "pmf.f64")
        errors = open(os.path.join(self._directory.name, "stderr"), "w+b")  # noqa: SIM115
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, workspace_args(self.vw_args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        assert child.stdin is not None and child.stdout is not None
        sizes: queue.Queue[np.ndarray | None] = queue.Queue()  # unbounded: never blocks
        failure: list[BaseException] = []
        reader = threading.Thread(
            target=_read_predictions, args=(child.stdout, sizes, path, failure), daemon=True
        )
        reader.start()
        cache = vw_text.ActionLineCache()
        done = 0
        if progress is not None:
            progress(f"vw:{self.vw_args}", 0)
        try:
            for chunk in source("rows"):
                sizes.put(chunk.sizes)
                lines = _render(chunk, cache)
                lines.append("")
                child.stdin.write("\n".join(lines).encode("utf-8"))
                done += len(chunk)
                if progress is not None:
                    progress(f"vw:{self.vw_args}", done)
            child.stdin.close()
        except BrokenPipeError:
            pass
        finally:
            sizes.put(None)
        code = child.wait()
        reader.join()
        errors.seek(0)
        error = errors.read().decode("utf-8", "replace").strip()
        errors.close()
        if code != 0 or failure:
            detail = str(failure[0]) if failure else (error.splitlines() or ["no message"])[-1]
            raise ValueError(f"VW failed on the log ({self.vw_args!r}): {detail}")
        self._file = open(path, "rb")  # noqa: SIM115 - read chunk by chunk, closed in close()

    def pmf(self, chunk: Chunk) -> np.ndarray:
        if self._file is None:
            raise RuntimeError("prepare() first")
        assert chunk.candidates is not None
        count = len(chunk.candidates)
        values = np.fromfile(self._file, dtype=np.float64, count=count)
        if len(values) != count:
            raise ValueError("VW gave fewer predictions than the log has rows")
        return values

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None


def _render(chunk: Chunk, cache: vw_text.ActionLineCache) -> list[str]:
    """The chunk's rows as VW multi-line examples, exactly as VWLearner.learn_slot builds
    them: the shared line, then each eligible candidate, the label on the logged one."""
    lines: list[str] = []
    labels = [
        f"0:{cost_from_reward(float(r))!r}:{float(p)!r}"
        for r, p in zip(chunk.reward, chunk.propensity, strict=True)
    ]
    assert chunk.chosen is not None
    chosen = chunk.chosen.tolist()
    if chunk.rows is not None:
        for i, row in enumerate(chunk.rows):
            lines.append(vw_text.shared_line(row.context, row.slot, row.slot_features))
            lines.extend(cache.line(c.id, c.features) for c in row.eligible)
            lines[len(lines) - len(row.eligible) + chosen[i]] = (
                labels[i] + lines[len(lines) - len(row.eligible) + chosen[i]]
            )
            lines.append("")
        return lines
    features = chunk.features
    if features is None:
        raise ValueError("a VW target needs the rows' features")
    if features.candidate_keys is not None:
        return _render_keyed(chunk, features, labels, chosen, cache)
    for i, candidates in enumerate(features.candidates):
        lines.append(
            vw_text.shared_line(
                features.contexts[i] or {}, features.slots[i], features.slot_features[i] or {}
            )
        )
        for c in candidates:
            if isinstance(c, dict):
                lines.append(cache.line(str(c["id"]), c.get("features") or {}))
            else:
                lines.append(cache.line(str(c), {}))
        at = len(lines) - len(candidates) + chosen[i]
        lines[at] = labels[i] + lines[at]
        lines.append("")
    return lines


_KEYED: dict[tuple[str, str], str] = {}


def _render_keyed(
    chunk: Chunk,
    features: RowFeatures,
    labels: list[str],
    chosen: list[int],
    cache: vw_text.ActionLineCache,
) -> list[str]:
    """As :func:`_render`, with candidates given as (id, features JSON text): each distinct
    pair is parsed and rendered once (bounded, like the service's ActionLineCache)."""
    assert features.candidate_keys is not None and chunk.offsets is not None
    keys = features.candidate_keys
    offsets = chunk.offsets.tolist()
    lines: list[str] = []
    for i in range(len(offsets) - 1):
        lines.append(
            vw_text.shared_line(
                features.contexts[i] or {}, features.slots[i], features.slot_features[i] or {}
            )
        )
        for key in keys[offsets[i] : offsets[i + 1]]:
            line = _KEYED.get(key)
            if line is None:
                if len(_KEYED) >= 100_000:
                    _KEYED.clear()
                line = _KEYED[key] = vw_text.action_line(
                    key[0], orjson.loads(key[1]) if key[1] else {}
                )
            lines.append(line)
        at = len(lines) - (offsets[i + 1] - offsets[i]) + chosen[i]
        lines[at] = labels[i] + lines[at]
        lines.append("")
    return lines


def _read_predictions(
    stream: IO[bytes],
    sizes: queue.Queue[np.ndarray | None],
    path: str,
    failure: list[BaseException],
) -> None:
    """For each chunk's row sizes, read that many prediction lines (blank lines between
    examples) and append the pmfs, in candidate order, to ``path``."""
    try:
        with open(path, "wb") as out:
            while True:
                row_sizes = sizes.get()
                if row_sizes is None:
                    return
                lines: list[bytes] = []
                while len(lines) < len(row_sizes):
                    line = stream.readline()
                    if not line:
                        raise ValueError("VW stopped before the end of the log")
                    if line.strip():
                        lines.append(line)
                text = b" ".join(lines).replace(b":", b" ").replace(b",", b" ")
                pairs = np.asarray(text.split(), dtype=np.float64).reshape(-1, 2)
                offsets = np.concatenate([[0], np.cumsum(row_sizes)])
                counts = np.asarray([line.count(b",") + 1 for line in lines])
                if not np.array_equal(counts, row_sizes):
                    raise ValueError("VW's predictions do not match the rows' candidates")
                starts = np.repeat(offsets[:-1], row_sizes)
                pmf = np.zeros(int(offsets[-1]))
                pmf[starts + pairs[:, 0].astype(np.int64)] = pairs[:, 1]
                totals = np.add.reduceat(pmf, offsets[:-1])
                pmf /= np.repeat(totals, row_sizes)
                pmf.tofile(out)
    except BaseException as exc:  # reported by prepare()
        failure.append(exc)
        while stream.read(1 << 16):  # drain VW so that it, and the writer, can finish
            pass
