"""Synthetic audio-caption webdataset shards in open_clip main's audio layout, and the decoder the
CLAP launcher test uses when torchcodec cannot decode here.

open_clip main's ``--dataset-type webdataset-audio`` reads tar samples ``<key>.<audio-ext>`` +
``<key>.txt`` (or ``.json``/``.cls``), decodes the audio bytes with ``torchaudio.load`` (torchaudio
>= 2.9 hands that to torchcodec, which needs FFmpeg's shared libraries) and preprocesses the
``(waveform, sample_rate)`` pair with its ``AudioPreprocess``. The shards here are 16-bit PCM WAV
sine tones, one frequency per class, captioned with the class's words.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
import wave

import numpy as np

TONE_WORDS = ("low hum", "deep drone", "soft buzz", "warm note", "clear whistle", "bright beep", "sharp ping",
               "high squeal")
CAPTIONS = ("a {w}", "the sound of a {w}", "a recording of a {w}", "someone playing a {w}")


def tone_wav(freq: float, seconds: float = 1.0, sample_rate: int = 16000, phase: float = 0.0,
             noise: float = 0.0, seed: int = 0) -> bytes:
    """A mono 16-bit PCM WAV of a sine tone (plus optional white noise)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.5 * np.sin(2 * math.pi * freq * t + phase)
    if noise:
        x = x + noise * np.random.default_rng(seed).standard_normal(len(t))
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_audio_shards(out_dir, n_train: int = 64, n_val: int = 32, train_shards: int = 2,
                       sample_rate: int = 16000, seed: int = 0) -> dict:
    """``{"train": pattern, "val": pattern}`` of tone shards (``<key>.wav``, ``<key>.txt``, ``<key>.cls``)."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)

    def samples(n, offset):
        for i in range(n):
            c = (i + offset) % len(TONE_WORDS)
            freq = 150.0 * 2 ** (c / 2) * (1 + 0.02 * rng.standard_normal())
            wav = tone_wav(freq, sample_rate=sample_rate, phase=float(rng.uniform(0, 2 * math.pi)), noise=0.05,
                           seed=int(rng.integers(1 << 30)))
            caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(w=TONE_WORDS[c])
            yield f"{offset + i:06d}", wav, caption, c

    def write(path, items):
        items = list(items)
        with tarfile.open(path, "w") as tar:
            for key, wav, caption, c in items:
                _add(tar, f"{key}.wav", wav)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.cls", str(c).encode())
        return len(items)

    sizes = {}
    per = n_train // train_shards
    for s in range(train_shards):
        sizes[f"train_{s:05d}.tar"] = write(os.path.join(out_dir, f"train_{s:05d}.tar"), samples(per, s * per))
    sizes["val_00000.tar"] = write(os.path.join(out_dir, "val_00000.tar"), samples(n_val, 10_000))
    with open(os.path.join(out_dir, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    last = train_shards - 1
    return {"train": os.path.join(out_dir, f"train_{{00000..{last:05d}}}.tar"),
            "val": os.path.join(out_dir, "val_00000.tar")}


def decode_wav(data: bytes):
    """``(waveform [channels, samples] float32 in [-1, 1], sample_rate)`` of 16-bit PCM WAV bytes: what
    ``torchaudio.load(io.BytesIO(data))`` returns for them."""
    import torch

    with wave.open(io.BytesIO(data), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"decode_wav reads 16-bit PCM only, got {8 * w.getsampwidth()}-bit")
        channels, rate, frames = w.getnchannels(), w.getframerate(), w.readframes(w.getnframes())
    x = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return torch.from_numpy(x.reshape(-1, channels).T.copy()), rate
