"""The launcher for the CLAP tests on open_clip main, decoding the test's WAV shards with the stdlib.

open_clip main decodes audio with ``torchaudio.load``, which (torchaudio >= 2.9) needs torchcodec and
FFmpeg's shared libraries; neither can be installed from PyPI beside this project's torch. Where
torchcodec cannot be imported, this driver replaces open_clip_train.audio_data's module-level decoder
``_decode_audio_bytes`` (bytes -> ``(waveform, sample_rate)``) with :func:`clap_audio.decode_wav`, the
same contract for 16-bit PCM WAV. Test-only; everything else (AudioPreprocess, the CLAP model,
CLAPTask, validation) is open_clip main's own code. Prints which decoder it used.
"""
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import open_clip_train.audio_data as audio_data  # noqa: E402

from clap_audio import decode_wav  # noqa: E402
from openclip_structure.main import main  # noqa: E402


def _torchcodec_decodes() -> bool:
    if importlib.util.find_spec("torchcodec") is None:
        return False
    try:
        from torchcodec.decoders import AudioDecoder  # noqa: F401 (loads FFmpeg)
        return True
    except Exception:  # noqa: BLE001 - no FFmpeg libraries
        return False


if not _torchcodec_decodes():
    audio_data._decode_audio_bytes = decode_wav
    print("clap_launcher: audio decoded by the stdlib wave module (no torchcodec/FFmpeg here)", flush=True)

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv[1:] if argv[:1] == ["--"] else argv))
