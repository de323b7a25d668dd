"""``rvclora infer INPUT --model M --hubert H --out OUT``: audio → audio, RVC's pipeline in JAX.

This module resolves the files (the voice and its adapters through ``rvclora_convert``, the
HuBERT/ContentVec and pitch models through the loaders ``rvclora prepare`` uses, the
retrieval index through :mod:`rvclora_jax.retrieval`) and writes the WAVs; the conversion
itself is :class:`rvclora_jax.pipeline.VoiceConverter` (RVC's ``Pipeline.pipeline``).

Every file is checked before any audio is converted: the voice (and that each adapter fits
it), the models, the index (its dimension against the voice's), the speaker id, and that
no output replaces an input or, without ``--overwrite``, an existing file.
"""

from __future__ import annotations

import os
import sys
import time

from . import _args as A
from ._outputs import add_overwrite, guard

F0_METHODS = ("rmvpe", "fcpe", "harvest")


def _audio_files(path: str) -> list[str]:
    from ..frontend.audio_io import AUDIO_EXTENSIONS

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such audio file or folder")
    if os.path.isfile(path):
        return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(AUDIO_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))
    if not files:
        raise ValueError(f"{path}: the folder holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return files


def _outputs(inputs: list[str], src: str, out: str) -> list[str]:
    """One WAV per input: ``--out`` itself for one file (or ``OUT/<stem>.wav`` when it is an
    existing folder), ``OUT/<stem>.wav`` for a folder of inputs."""
    if os.path.isfile(src) and not os.path.isdir(out):
        return [out]
    names = [os.path.splitext(os.path.basename(f))[0] + ".wav" for f in inputs]
    seen: dict[str, str] = {}
    for f, n in zip(inputs, names):
        if n in seen:
            raise ValueError(f"{f}: would write the same output {n} as {seen[n]}; rename one of them")
        seen[n] = f
    return [os.path.join(out, n) for n in names]


def _adapter_files(specs) -> list[str]:
    from .adapters import _adapter_inputs

    return [q for p, _ in specs for q in _adapter_inputs(p)]


def _cmd_infer(args) -> int:
    from .adapters import _parse_weighted

    specs = [_parse_weighted(s) for s in (args.adapter or [])]
    inputs = _audio_files(args.input)
    outs = _outputs(inputs, args.input, args.out)
    reads = [args.input, args.hubert, args.f0_model, args.index, *_adapter_files(specs)]
    # A model folder (a RUN_DIR, a converted model) is read file by file, not as a whole:
    # a run may keep its conversions inside it (the example writes RUN_DIR/infer/).
    if os.path.isdir(args.model):
        reads += [p for p in (os.path.join(args.model, f) for f in os.listdir(args.model)) if os.path.isfile(p)]
    else:
        reads.append(args.model)
    if os.path.isfile(args.input) and not os.path.isdir(args.out):
        g = guard(reads, files=outs, overwrite=args.overwrite)
    else:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"{args.out}: INPUT is a folder, so --out must be a folder")
        g = guard(reads, into=[args.out], overwrite=args.overwrite)
        g.add_files(outs)
    with g.cleanup_on_failure():
        return _infer(args, specs, inputs, outs)


def build_converter(args, specs):
    """The :class:`~rvclora_jax.pipeline.VoiceConverter` the flags describe (every model file
    loaded and checked)."""
    from ..frontend.pitch import pitch_method
    from ..models.synthesizer import INFER_NOISE_SCALE
    from ..pipeline import PipelineConfig, VoiceConverter
    from . import prepare as P  # registers the rmvpe/fcpe loaders
    from .render import load_voice

    synth, src = load_voice(args.model, specs, run_scale=1.0)
    version = synth.version
    output = args.hubert_output or version
    if output[:2] != version:
        raise ValueError(f"--hubert-output {output} gives {output[:2]} features, but {src.path} is a "
                         f"{version} model")
    content = P.content_features(args.hubert, output)  # (the pipeline feeds it the raw waveform, as RVC)
    pitch = None
    if synth.f0:
        # harvest comes back as the plain function, which the converter gives PipelineConfig's
        # filter_radius; the factory refuses a --f0-model for it
        pitch = pitch_method(args.f0_method, args.f0_model)
    elif args.f0_up_key or args.f0_model:
        print(f"note: {src.path} is a model without pitch (nono): --f0-up-key/--f0-model have no effect",
              file=sys.stderr)
    index = None
    if args.index and args.index_rate > 0:
        from ..retrieval import read_index

        index = read_index(args.index)
    cfg = PipelineConfig(f0_up_key=args.f0_up_key, index_rate=args.index_rate, protect=args.protect,
                         rms_mix_rate=args.rms_mix_rate, filter_radius=args.filter_radius,
                         resample_sr=args.resample_sr)
    noise = INFER_NOISE_SCALE if args.noise_scale is None else args.noise_scale
    vc = VoiceConverter(synth, content, pitch=pitch, index=index, config=cfg, sid=args.sid,
                        noise_scale=noise, seed=args.seed, batch_size=args.batch_size)
    return vc, src


def _infer(args, specs, inputs, outs) -> int:
    import numpy as np

    from ..frontend.audio_io import AudioError
    from ..pipeline import load_input
    from ..render import write_wav

    t0 = time.perf_counter()
    vc, src = build_converter(args, specs)
    wavs, kept, skipped = [], [], []
    for f, o in zip(inputs, outs):
        try:
            wavs.append(load_input(f))
            kept.append((f, o))
        except (AudioError, OSError, ValueError) as e:
            if len(inputs) == 1:
                raise
            skipped.append(f)
            print(f"skipped: {' '.join(str(e).split())}", file=sys.stderr)
    total = sum(w.size for w in wavs) / 16000.0
    bar = _progress(total, args.no_progress)
    t1 = time.perf_counter()
    def progress(done_s):  # the converter reports cumulative seconds of input converted
        bar.n = round(min(done_s, total), 2)
        bar.refresh()

    results = vc.batch(wavs, progress=progress if bar else None)
    if bar:
        bar.close()
    conv_s = time.perf_counter() - t1
    sr = vc.out_sr
    for (f, o), y in zip(kept, results):
        write_wav(o, np.asarray(y, np.float64) / 32768.0, sr)
        print(f"{o}: {len(y) / sr:.2f} s at {sr} Hz (from {f})")
    rtf = conv_s / total if total else 0.0
    print(f"converted {len(kept)} file(s), {total:.1f} s of audio in {conv_s:.1f} s "
          f"(real-time factor {rtf:.3f}, compiling included; {time.perf_counter() - t0:.1f} s with loading)")
    if skipped:
        print(f"  {len(skipped)} skipped (listed above)")
    return 0


def _progress(total_s: float, off: bool):
    if off or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=round(total_s, 2), unit="audio-s", unit_scale=False, desc="converting",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} audio-s "
                           "[{elapsed}<{remaining}, {rate_fmt}]")


def register(sub) -> None:
    p = sub.add_parser(
        "infer", help="convert recordings with a voice (+ adapters): RVC's inference pipeline in JAX",
        description="Audio to audio as RVC's Pipeline does it: 16 kHz high-pass, split at quiet points, "
                    "HuBERT/ContentVec features, pitch with key shift, optional index retrieval, protect, "
                    "RMS mixing, the voice's synthesizer. MODEL is an RVC .pth (inference model or "
                    "training base), a converted directory, or a training RUN_DIR.")
    p.add_argument("input", metavar="INPUT", help="an audio file, or a folder of them")
    p.add_argument("--model", required=True, metavar="MODEL", help="voice.pth | BASE.pth | RUN_DIR")
    p.add_argument("--adapter", action="append", metavar="ADAPTER[:WEIGHT]",
                   help="adapter directory to merge (repeat to mix exactly: --adapter a:0.7 --adapter b:0.3)")
    p.add_argument("--hubert", required=True, help="hubert_base.pt (RVC) or a ContentVec/HuBERT folder (HF)")
    p.add_argument("--hubert-output", choices=["v2", "v1", "v1-applio"], default=None,
                   help="default: the model's version (v1: layer 9 through final_proj, as RVC)")
    p.add_argument("--out", required=True, metavar="OUT.wav|OUTDIR", help="output WAV (a folder for a folder)")
    p.add_argument("--f0-method", default="rmvpe", choices=F0_METHODS)
    p.add_argument("--f0-model", help="rmvpe.pt (rmvpe), or fcpe weights (default: torchfcpe's own)")
    p.add_argument("--f0-up-key", type=A.finite_float, default=0.0, metavar="SEMITONES",
                   help="pitch shift in semitones (default 0)")
    p.add_argument("--index", metavar="FILE.index", help="RVC/Applio retrieval index (faiss IVF-Flat)")
    p.add_argument("--index-rate", type=A.unit_float, default=0.75, help="retrieval blend (RVC: 0.75)")
    p.add_argument("--protect", type=A.unit_float, default=0.33,
                   help="keep unvoiced consonants' own features (RVC: 0.33; 0.5 = off)")
    p.add_argument("--rms-mix-rate", type=A.unit_float, default=0.25,
                   help="1 = the voice's own loudness, 0 = the input's envelope (RVC: 0.25)")
    p.add_argument("--filter-radius", type=A.non_negative_int, default=3,
                   help="harvest: median filter when >= 3 (RVC: 3)")
    p.add_argument("--resample-sr", type=A.non_negative_int, default=0,
                   help="resample the output to this rate (0: the model's rate)")
    p.add_argument("--sid", type=A.non_negative_int, default=0, help="speaker id (row of emb_g, default 0)")
    p.add_argument("--noise-scale", type=A.non_negative_float, default=None,
                   help="prior noise scale (RVC: 0.66666, the default); 0 = deterministic")
    p.add_argument("--seed", type=A.seed, default=0, help="random seed of the noise (default 0)")
    p.add_argument("--batch-size", type=A.positive_int, default=4, help="chunks per batch (default 4)")
    p.add_argument("--no-progress", action="store_true")
    add_overwrite(p)
    p.set_defaults(func=_cmd_infer)
