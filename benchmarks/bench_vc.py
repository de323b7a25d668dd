"""Audio-to-audio conversion: rvclora-jax's pipeline vs RVC's own PyTorch pipeline.

    python benchmarks/bench_vc.py [--seconds 30] [--repeats 3] [--f0-method rmvpe] [--no-index]

Both sides convert the same input (speech clips from tests/data, repeated to
``--seconds``) with the same models: random weights in the real layouts (HuBERT base as a
Hugging Face folder, RVC's E2E RMVPE as ``rmvpe.pt``, a v2 40k f0 synthesizer as an RVC
inference ``.pth``), the same faiss IVF-Flat index (RVC's recipe, on 30 000 random
768-d vectors), RVC's CPU settings (x_pad 1, x_query 6, x_center 38, x_max 41),
index_rate 0.75, protect 0.33, rms_mix_rate 0.25, and noise off on our side (RVC has no
noise-free mode; noise costs it nothing measurable).

The torch side is ``rvc.modules.vc.pipeline.Pipeline.pipeline`` itself (rvc==0.3.5) with
a fairseq-style wrapper around ``transformers.HubertModel`` (what RVC calls:
``extract_features(source, padding_mask, output_layer)``); the JAX side is
:class:`rvclora_jax.pipeline.VoiceConverter` with the models read by ``rvclora_convert``.
Each side runs in its own process, alternating, ``--repeats`` times. Per process: the
first conversion (JAX: including compilation; the persistent compile cache is off) and
the median of the next ``--steady`` conversions, wall and CPU time, and the real-time
factor (seconds of compute per second of audio). ``--which jax|torch --work DIR`` runs one
side on prepared files and prints its ``RESULT`` json line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CFG = dict(x_pad=1, x_query=6, x_center=38, x_max=41)
SETTINGS = dict(f0_up_key=0, index_rate=0.75, filter_radius=3, rms_mix_rate=0.25, protect=0.33, resample_sr=0)
N_INDEX = 30000


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _input(seconds: float):
    import numpy as np

    from tests.speech import speech_file

    from rvclora_jax.frontend.audio_io import load_audio

    clips = [load_audio(speech_file(name), 16000) for name in ("arctic_a0007.wav", "arctic_a0009.wav")]
    gap = np.zeros(4000, np.float32)  # 0.25 s pauses: RVC's split points fall in them
    out, n = [], 0
    while n < seconds * 16000:
        for c in clips:
            out += [c, gap]
            n += c.size + gap.size
    return np.concatenate(out)[: int(seconds * 16000)].astype(np.float32)


def prepare(work: str, seconds: float) -> None:
    """The shared files: models (torch-made, random weights), index, input. The index is
    faiss's own when faiss is installed, else ours (the same file format; a lent GPU
    machine may lack faiss)."""
    import numpy as np
    import torch
    from rvc.lib.infer_pack.models import SynthesizerTrnMs768NSFsid
    from rvc.lib.rmvpe import E2E
    from scipy.io import wavfile
    from transformers import HubertConfig, HubertModel

    from rvclora_jax.families.rvc import RVC

    torch.manual_seed(0)
    hub = HubertModel(HubertConfig()).eval()  # hubert-base layout
    hub.save_pretrained(os.path.join(work, "hubert"))
    torch.save(torch.nn.Linear(768, 256).state_dict(), os.path.join(work, "final_proj.pt"))
    e2e = E2E(4, 1, (2, 2)).eval()
    torch.save(e2e.state_dict(), os.path.join(work, "rmvpe.pt"))
    cfg = RVC.preset("v2", 40000).to_list()
    g = SynthesizerTrnMs768NSFsid(*cfg, is_half=False).eval()
    sd = {k: v for k, v in g.state_dict().items() if not k.startswith("enc_q.")}
    torch.save({"weight": sd, "config": cfg, "info": "bench", "sr": "40k", "f0": 1, "version": "v2"},
               os.path.join(work, "voice.pth"))
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((N_INDEX, 768)).astype(np.float32)
    n_ivf = min(int(16 * np.sqrt(N_INDEX)), N_INDEX // 39)
    try:
        import faiss
    except ImportError:
        from rvclora_jax.retrieval import build_index, write_index

        write_index(build_index(feats), os.path.join(work, "added.index"))
    else:
        index = faiss.index_factory(768, f"IVF{n_ivf},Flat")
        faiss.extract_index_ivf(index).nprobe = 1
        index.train(feats)
        for i in range(0, N_INDEX, 8192):
            index.add(feats[i:i + 8192])
        faiss.write_index(index, os.path.join(work, "added.index"))
    wavfile.write(os.path.join(work, "input.wav"), 16000, _input(seconds))


def _stub_modules():
    """Stand-ins for what rvc's pipeline imports at module level but this run does not use:
    parselmouth and torchcrepe (pm / crepe f0), pyworld (whose ``__init__`` fails without
    ``pkg_resources``; missing on a bare GPU machine), faiss when absent (the index is then
    off on both sides), and librosa's ``feature.rms`` when librosa is absent (our
    :func:`rvclora_jax.pipeline.rms_envelope`, equal to it, tested)."""
    import importlib.util
    import types

    def missing(name):  # not installed, or only one of our stand-ins
        if name in sys.modules:
            return getattr(sys.modules[name], "__file__", None) is None
        return importlib.util.find_spec(name) is None

    for name in ("parselmouth", "torchcrepe"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        from rvclora_jax.frontend.pitch import _pyworld

        sys.modules.setdefault("pyworld", _pyworld())
    except ImportError:
        sys.modules.setdefault("pyworld", types.ModuleType("pyworld"))
    if missing("faiss"):
        sys.modules.setdefault("faiss", types.ModuleType("faiss"))
    if missing("librosa"):
        from rvclora_jax.pipeline import rms_envelope

        lib = sys.modules.setdefault("librosa", types.ModuleType("librosa"))
        feature = types.ModuleType("librosa.feature")

        def rms(*, y, frame_length, hop_length, **_):
            assert frame_length == 2 * hop_length
            return rms_envelope(y, frame_length)[None]

        feature.rms = rms
        lib.feature = feature
        sys.modules["librosa.feature"] = feature
        util = types.ModuleType("librosa.util")  # rvc.lib.rmvpe's import line; its STFT is unused
        util.normalize = util.pad_center = util.tiny = None
        lib.util = util
        sys.modules.setdefault("librosa.util", util)


def run_torch(work: str, f0_method: str, use_index: bool, steady: int, device: str = "cpu") -> dict:
    import numpy as np
    import torch
    from rvc.lib.infer_pack.models import SynthesizerTrnMs768NSFsid
    from rvc.lib.rmvpe import RMVPE
    from scipy.io import wavfile
    from transformers import HubertModel

    _stub_modules()
    from rvc.modules.vc.pipeline import Pipeline

    class FairseqHubert(torch.nn.Module):
        def __init__(self, folder):
            super().__init__()
            self.hf = HubertModel.from_pretrained(folder).eval()
            self.final_proj = torch.nn.Linear(768, 256)
            self.final_proj.load_state_dict(torch.load(os.path.join(work, "final_proj.pt")))

        def extract_features(self, source, padding_mask=None, output_layer=None):
            out = self.hf(source, output_hidden_states=True)
            return out.hidden_states[output_layer], None

    t0, c0 = time.perf_counter(), _cpu()
    cpt = torch.load(os.path.join(work, "voice.pth"), map_location="cpu", weights_only=True)
    g = SynthesizerTrnMs768NSFsid(*cpt["config"], is_half=False)
    del g.enc_q
    g.load_state_dict(cpt["weight"], strict=False)
    g.eval().to(device)
    hub = FairseqHubert(os.path.join(work, "hubert")).to(device)
    cfg = type("Cfg", (), dict(CFG, is_half=False, device=device))()
    pipe = Pipeline(cpt["config"][-1], cfg)
    if f0_method == "rmvpe":
        pipe.model_rmvpe = RMVPE(os.path.join(work, "rmvpe.pt"), is_half=False, device=device)
    _, audio = wavfile.read(os.path.join(work, "input.wav"))
    audio = audio.astype(np.float32)
    load_s = time.perf_counter() - t0

    stages = []

    def once():
        times = {"npy": 0, "f0": 0, "infer": 0}
        stages.append(times)  # RVC's own stage timers: HuBERT + retrieval, f0, synthesizer
        return pipe.pipeline(hub, g, 0, audio.copy(), "input.wav", times, SETTINGS["f0_up_key"], f0_method,
                             os.path.join(work, "added.index") if use_index else "", SETTINGS["index_rate"], 1,
                             SETTINGS["filter_radius"], cpt["config"][-1], SETTINGS["resample_sr"],
                             SETTINGS["rms_mix_rate"], "v2", SETTINGS["protect"])

    with torch.no_grad():
        r = _measure(once, audio.size / 16000, load_s, steady, t0, c0)
    r["stages"] = stages
    return r


def run_jax(work: str, f0_method: str, use_index: bool, steady: int) -> dict:
    import numpy as np
    from scipy.io import wavfile

    from rvclora_convert.export import load_source
    from rvclora_convert.hubert import load_hubert
    from rvclora_convert.rmvpe import load_rmvpe
    from rvclora_jax.frontend.hubert import ContentFeatures
    from rvclora_jax.frontend.pitch import harvest
    from rvclora_jax.frontend.rmvpe import RMVPEPitch
    from rvclora_jax.pipeline import PipelineConfig, VoiceConverter
    from rvclora_jax.retrieval import read_index

    t0, c0 = time.perf_counter(), _cpu()
    synth = load_source(os.path.join(work, "voice.pth")).model
    hub = load_hubert(os.path.join(work, "hubert"))
    content = ContentFeatures(hub, output="v2", normalize=False)
    if f0_method == "rmvpe":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pitch = RMVPEPitch(load_rmvpe(os.path.join(work, "rmvpe.pt")))
    else:
        pitch = harvest  # the converter applies PipelineConfig's filter_radius
    index = read_index(os.path.join(work, "added.index")) if use_index else None
    vc = VoiceConverter(synth, content, pitch=pitch, index=index, config=PipelineConfig(**CFG, **SETTINGS),
                        noise_scale=0.0)
    _, audio = wavfile.read(os.path.join(work, "input.wav"))
    audio = audio.astype(np.float32)
    load_s = time.perf_counter() - t0
    # The converter's stages, timed as RVC's own timers split its pipeline: "npy" content
    # features + retrieval, "f0" the pitch tracker, "infer" the synthesizer (each stage
    # returns host arrays, so wall time here is the stage's own).
    stages: list[dict] = []
    for attr, key in (("_content", "npy"), ("_f0", "f0"), ("_synthesize", "infer")):
        def timed(*args, _f=getattr(vc, attr), _k=key, **kw):
            w = time.perf_counter()
            try:
                return _f(*args, **kw)
            finally:
                stages[-1][_k] += time.perf_counter() - w
        setattr(vc, attr, timed)

    def once():
        stages.append({"npy": 0.0, "f0": 0.0, "infer": 0.0})
        return vc(audio)
    r = _measure(once, audio.size / 16000, load_s, steady, t0, c0)
    r["stages"] = stages
    return r


def _measure(once, audio_s: float, load_s: float, steady: int, t0: float, c0: float) -> dict:
    import numpy as np

    w, c = time.perf_counter(), _cpu()
    y = once()
    first = (time.perf_counter() - w, _cpu() - c)
    walls, cpus = [], []
    for _ in range(steady):
        w, c = time.perf_counter(), _cpu()
        once()
        walls.append(time.perf_counter() - w)
        cpus.append(_cpu() - c)
    import resource

    return {"audio_s": audio_s, "load_s": load_s, "first_wall": first[0], "first_cpu": first[1],
            "steady_wall": float(np.median(walls)) if walls else None,
            "steady_cpu": float(np.median(cpus)) if cpus else None,
            "total_wall": time.perf_counter() - t0, "total_cpu": _cpu() - c0,
            "out_samples": int(np.asarray(y).size),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steady", type=int, default=2, help="conversions after the first, per process")
    ap.add_argument("--f0-method", default="rmvpe", choices=["rmvpe", "harvest"])
    ap.add_argument("--no-index", action="store_true")
    ap.add_argument("--which", choices=["jax", "torch"])
    ap.add_argument("--work", help="folder with the prepared files (default: a new temporary folder)")
    ap.add_argument("--json", help="write all results here")
    a = ap.parse_args()
    if a.which:
        if a.which == "jax":
            os.environ.setdefault("RVCLORA_COMPILE_CACHE", "off")
            os.environ["JAX_COMPILATION_CACHE_DIR"] = ""
            r = run_jax(a.work, a.f0_method, not a.no_index, a.steady)
        else:
            r = run_torch(a.work, a.f0_method, not a.no_index, a.steady)
        print("RESULT " + json.dumps(r), flush=True)
        return
    work = a.work or tempfile.mkdtemp(prefix="bench_vc_")
    if not os.path.exists(os.path.join(work, "input.wav")):
        print(f"preparing models, index and a {a.seconds:.0f} s input in {work}", flush=True)
        prepare(work, a.seconds)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    results: dict[str, list] = {"torch": [], "jax": []}
    for i in range(a.repeats):
        for side in ("torch", "jax") if i % 2 == 0 else ("jax", "torch"):
            cmd = [sys.executable, __file__, "--which", side, "--work", work, "--f0-method", a.f0_method,
                   "--steady", str(a.steady)] + (["--no-index"] if a.no_index else [])
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"{side} failed:\n{p.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            results[side].append(r)
            print(f"{side:5s} run {i}: first {r['first_wall']:.1f} s wall / {r['first_cpu']:.1f} s cpu; "
                  f"steady {r['steady_wall'] or 0:.1f} s wall / {r['steady_cpu'] or 0:.1f} s cpu; "
                  f"load {r['load_s']:.1f} s; peak {r['peak_rss_gb']:.2f} GB", flush=True)
    import numpy as np

    def med(side, key):
        vals = [r[key] for r in results[side] if r[key] is not None]
        return float(np.median(vals)) if vals else float("nan")

    audio_s = results["torch"][0]["audio_s"]
    print(f"\n{audio_s:.0f} s input, f0 {a.f0_method}, index {'off' if a.no_index else 'on'} "
          f"(medians of {a.repeats} processes each)")
    print(f"{'':22s}{'torch':>10s}{'jax':>10s}{'ratio':>8s}")
    for key, label in (("first_wall", "first conversion wall"), ("first_cpu", "first conversion cpu"),
                       ("steady_wall", "steady wall"), ("steady_cpu", "steady cpu"),
                       ("total_wall", "process total wall"), ("peak_rss_gb", "peak RSS GB")):
        t, j = med("torch", key), med("jax", key)
        print(f"{label:22s}{t:10.2f}{j:10.2f}{t / j:8.2f}x")
    for side in ("torch", "jax"):
        print(f"real-time factor {side}: steady {med(side, 'steady_wall') / audio_s:.3f}, "
              f"first {med(side, 'first_wall') / audio_s:.3f}")
    # per-stage wall time of the steady conversions (RVC's timers on the torch side)
    steady_stages = {side: [st for r in results[side] for st in (r.get("stages") or [])[1:]]
                     for side in ("torch", "jax")}
    for key, label in (("npy", "content + retrieval"), ("f0", "f0"), ("infer", "synthesizer")):
        t, j = (float(np.median([st[key] for st in steady_stages[side]])) if steady_stages[side] else float("nan")
                for side in ("torch", "jax"))
        print(f"stage {label:20s}{t:8.2f}{j:10.2f}{t / j:8.2f}x   (steady, wall s)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
