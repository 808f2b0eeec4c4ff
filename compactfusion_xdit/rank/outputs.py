"""What a run shows and writes: the step progress bar, image/video files, the closing summary line.

    outputs.quiet_libraries(verbose=False)              # first thing in a rank: no third-party logs
    outputs.quiet_progress(pipe, rank)                  # tqdm over denoising steps on rank 0 only
    outputs.write_request_files([RequestFiles("images", images, stats)], "out", "image")
    print(outputs.summary_line(elapsed, requests, raw_bytes, sent_bytes))

The one output writer of the worker (``xfuser``) and the drop-in runner (``cfx-xdit``).

Video: an mp4 (H.264) when PyAV (``pip install av``) is importable, else one PNG per frame in a
folder plus the frames as ``.npy`` (uint8, frames x height x width x 3). `video_backend()` says which.
Audio: one 16-bit PCM WAV per waveform (stdlib ``wave``) at the pipeline's sample rate, plus every
waveform as float ``.npy`` (waveforms x samples).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from typing import Any, Sequence

import numpy as np

#: Libraries whose warnings a rank hides unless ``--verbose`` (a `warnings` module regex).
THIRD_PARTY = r"(diffusers|transformers|torch|xfuser|yunchang|huggingface_hub|accelerate|flash_attn)(\.|$)"


def quiet_libraries(verbose: bool) -> None:
    """Hide the libraries' log lines, warnings and loading bars unless `verbose`.

    Call it before xfuser, diffusers or transformers are imported: xfuser reads ``LOG_LEVEL`` and
    transformers ``TRANSFORMERS_VERBOSITY`` when their logging modules load. A variable the user
    set is kept. Errors still show; the denoising bar (`quiet_progress`) is not affected; diffusers'
    loading bar is hidden by `quiet_loading` once diffusers is imported anyway."""
    if verbose:
        return
    for name, value in (("LOG_LEVEL", "ERROR"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("DIFFUSERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    for name in ("xfuser", "diffusers", "transformers", "torch", "yunchang"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=THIRD_PARTY)


def quiet_loading(verbose: bool) -> None:
    """Hide diffusers' "Loading pipeline components" bar unless `verbose` (it reads no variable;
    call after xfuser is imported, as importing diffusers alone takes seconds)."""
    if not verbose:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


def quiet_progress(pipe: Any, rank: int) -> None:
    """Show the pipeline's tqdm bar over denoising steps on rank 0 only (diffusers' progress bar,
    which xfuser's wrappers forward to)."""
    setter = getattr(pipe, "set_progress_bar_config", None)
    if setter is not None:
        setter(disable=rank != 0, desc="denoising" if rank == 0 else None)


def video_backend() -> str:
    """``"mp4"`` when an H.264 encoder is importable (PyAV), else ``"frames"``."""
    try:
        import av  # noqa: F401
    except ImportError:
        return "frames"
    return "mp4"


def _frames_uint8(frames: Any) -> np.ndarray:
    """Frames (list of PIL images or float arrays in [0, 1], or uint8 arrays) -> uint8 (T, H, W, 3)."""
    if isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "convert"):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    array = np.asarray(frames)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.ndim == 5:  # a batch of one video
        array = array[0]
    return array


def save_video(frames: Any, stem: str, fps: int) -> list[str]:
    """Write one video as ``stem.mp4`` (PyAV) or ``stem/frame_NNNN.png`` + ``stem.npy``; return the paths."""
    array = _frames_uint8(frames)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    if video_backend() == "mp4":
        import av

        path = stem + ".mp4"
        height, width = array.shape[1] // 2 * 2, array.shape[2] // 2 * 2  # yuv420p needs even sides
        with av.open(path, mode="w") as container:
            stream = container.add_stream("libx264", rate=max(int(fps), 1))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for frame in array:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame[:height, :width], format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return [path]
    from PIL import Image

    os.makedirs(stem, exist_ok=True)
    paths = []
    for i, frame in enumerate(array):
        path = os.path.join(stem, f"frame_{i:04d}.png")
        Image.fromarray(frame).save(path)
        paths.append(path)
    np.save(stem + ".npy", array)
    return paths + [stem + ".npy"]


def save_audio(waveforms: Any, stem: str, sample_rate: int) -> list[str]:
    """Write waveforms (waveforms x samples, floats in [-1, 1]) as ``stem_<i>.wav`` (mono, 16-bit PCM)
    and all of them as ``stem.npy`` (float32); return the paths."""
    import wave

    array = np.asarray(waveforms, dtype=np.float32)
    array = array.reshape(-1, array.shape[-1])
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    paths = []
    for i, waveform in enumerate(array):
        path = f"{stem}_{i}.wav"
        pcm = (np.clip(waveform, -1.0, 1.0) * 32767.0).round().astype("<i2")
        with wave.open(path, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(int(sample_rate))
            out.writeframes(pcm.tobytes())
        paths.append(path)
    np.save(stem + ".npy", array)
    return paths + [stem + ".npy"]


def save_images(images: Sequence[Any], stem: str) -> list[str]:
    """Write PIL images as ``stem_<i>.png``; return the paths."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = f"{stem}_{i}.png"
        image.save(path)
        paths.append(path)
    return paths


@dataclasses.dataclass
class RequestFiles:
    """What one request writes: ``kind`` is "images" (PIL images), "videos" (one frame list per
    video), "audio" (waveforms; `stats` holds ``sample_rate``) or "latents" (a tensor); `stats` is its
    stats.json entry (``outputs`` is filled in)."""

    kind: str
    items: Any
    stats: dict


def write_request_files(results: Sequence[RequestFiles], directory: str, name: str, fps: int = 16) -> list[str]:
    """Write every request's files and one ``stats.json``; return the paths written.

    One request: ``<name>_<i>.png`` (images), ``<name>_<i>.mp4`` (videos; frames + ``.npy`` without
    PyAV), ``<name>_<i>.wav`` + ``<name>.npy`` (audio) or ``<name>.npy`` (latents), and its stats as stats.json. Several: the same names prefixed
    ``req<NNNN>_``, and stats.json holds ``requests`` (one entry each) with the summed bytes and time.
    """
    os.makedirs(directory, exist_ok=True)
    written = []
    for n, result in enumerate(results):
        stem = os.path.join(directory, (f"req{n:04d}_" if len(results) > 1 else "") + name)
        files = []
        if result.kind == "latents" and result.items is not None:
            files = [stem + ".npy"]
            np.save(files[0], result.items.detach().float().cpu().numpy())
        elif result.kind == "videos" and result.items is not None:
            for i, video in enumerate(result.items):
                files += save_video(video, f"{stem}_{i}", fps=fps)
        elif result.kind == "audio" and result.items is not None:
            files = save_audio(result.items, stem, result.stats["sample_rate"])
        elif result.items is not None:
            files = save_images(result.items, stem)
        result.stats["outputs"] = [os.path.relpath(p, directory) for p in files]
        written += files
    if len(results) == 1:
        summary = results[0].stats
    else:
        raw = sum(r.stats["raw_bytes"] for r in results)
        sent = sum(r.stats["sent_bytes"] for r in results)
        summary = {"requests": [r.stats for r in results], "raw_bytes": raw, "sent_bytes": sent,
                   "ratio": raw / sent if sent else 1.0, "elapsed_s": sum(r.stats["elapsed_s"] for r in results)}
    path = os.path.join(directory, "stats.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return written + [path]


def produced_size(items: Any) -> tuple[int, int] | None:
    """``(height, width)`` of the first image or video frame of a pipeline output (PIL images, or
    frames as PIL images or a (..., H, W, C) array); None for latents or no output."""
    first = items
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if hasattr(first, "convert") and hasattr(first, "size"):  # a PIL image: size is (width, height)
        return int(first.size[1]), int(first.size[0])
    if isinstance(first, np.ndarray) and first.ndim >= 3 and first.shape[-1] in (1, 3, 4):
        return int(first.shape[-3]), int(first.shape[-2])
    return None


def from_output_rank(paths: list[str]) -> list[str]:
    """The output rank's `paths`, on every rank (a collective over the world group; waits until
    that rank has written them). Without torch.distributed: `paths` itself."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return paths
    box = [paths]
    dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
    return box[0]


def summary_line(elapsed_s: float, requests: int, raw_bytes: int, sent_bytes: int, compression: str,
                 written: Sequence[str] | None = None) -> str:
    """The closing line rank 0 prints: time, the file written (or how many), bytes sent and saved,
    compression ratio. `written`: the paths written (stats.json is not named)."""
    files = [p for p in written or () if os.path.basename(p) != "stats.json"]
    where = ""
    if len(files) == 1:
        where = f" -> {files[0]}"
    elif files:
        where = f" -> {len(files)} files in {os.path.dirname(files[0]) or '.'}"
    if raw_bytes == 0:
        traffic = f"compression {compression} (no bytes saved)"
    elif compression == "none":
        traffic = f"compression none: sent {_size(sent_bytes)} uncompressed, ratio 1.00x"
    else:
        saved = raw_bytes - sent_bytes
        traffic = (f"compression {compression}: sent {_size(sent_bytes)} of {_size(raw_bytes)}, "
                   f"saved {_size(saved)} ({saved / raw_bytes:.1%}), ratio {raw_bytes / sent_bytes:.2f}x")
    plural = "" if requests == 1 else "s"
    return f"done: {requests} request{plural} in {elapsed_s:.2f} s{where}; {traffic}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
