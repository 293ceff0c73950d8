"""Scalars a person can watch while a run trains: TensorBoard event files under
``<workdir>/metrics/`` (written with tensorboardX, no TensorFlow needed).

  tensorboard --logdir=<workdir>/metrics

Tags are ``<stage>/<metric>`` (``recommender/loss``, ``denoiser_fgsm/content``,
``eval/vbpr/clean/HR_10``, ``attack/pgd_8/images_per_s`` ...: TensorBoard tags allow no ``@``,
tensorboardX writes it as ``_``); the step is the stage's own
step (optimizer step, or epoch where only epochs exist). A writer is opened per run and
closed at its end; every write is flushed, so a killed run keeps what it wrote.
"""

from __future__ import annotations

import math

from jaxvars import fs

METRICS_DIR = "metrics"


class MetricWriter:
  """Writes scalars to ``<workdir>/metrics`` (or nowhere when ``workdir`` is None, and on
  every process but process 0 of a multi-process run)."""

  def __init__(self, workdir: str | None):
    self._writer = None
    from jaxvars import distributed
    if workdir and distributed.is_main():  # Process 0 writes for every process.
      from tensorboardX import SummaryWriter
      # tensorboardX writes gs:// and s3:// itself (google-cloud-storage / boto3).
      self._writer = SummaryWriter(fs.join(workdir, METRICS_DIR), flush_secs=10)

  def scalars(self, prefix: str, step: int, values: dict) -> None:
    """Writes every finite float of ``values`` as ``<prefix>/<key>`` at ``step``."""
    if self._writer is None:
      return
    for key, value in values.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        self._writer.add_scalar(f"{prefix}/{key}", float(value), int(step))
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the event files under ``<workdir>/metrics`` (for tests and
  quick looks; TensorBoard reads the same files)."""
  from tensorboardX.proto import event_pb2
  import struct

  out: dict[str, list] = {}
  directory = fs.join(workdir, METRICS_DIR)
  for name in sorted(fs.listdir(directory)) if fs.isdir(directory) else []:
    data = fs.read_bytes(fs.join(directory, name))
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      body = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(body)
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
  return out
