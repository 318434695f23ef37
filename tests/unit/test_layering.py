"""The layering rule: the front doors and the core never load torch or reach past the engine's door.

A remote engine (a Ray actor) only works if what sits above `engine/` speaks plain values:
these tests hold that in a fresh interpreter, where nothing else has imported torch first.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import tinkerd.api
import tinkerd.core

SRC = Path(__file__).resolve().parents[2] / "src"


def _fresh_interpreter(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _modules(package) -> list[str]:
    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def test_api_and_core_import_no_torch_and_no_engine_internals():
    modules = ["tinkerd.api.app", *_modules(tinkerd.api), *_modules(tinkerd.core)]
    assert "tinkerd.api.openai_routes" in modules and "tinkerd.core.service" in modules  # the walk found them
    loaded = _fresh_interpreter(
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    assert "torch" not in loaded, "api/ or core/ imported torch"
    assert not [m for m in loaded if m.startswith("tinkerd.engine")], "api/ or core/ imported engine modules, not just its door's types"


def test_the_front_doors_tokenizer_loads_without_torch(model_dir):
    """What the doors need of a model (tokenizer, chat template) comes without the model's code."""
    loaded = _fresh_interpreter(
        "import json, sys\n"
        "from tinkerd.core.tokenizers import tokenizer_of\n"
        "from tinkerd.types import ModelInfo\n"
        f"tok = tokenizer_of(ModelInfo('m', {str(model_dir)!r}, 8192, 49152, (2,)))\n"
        "text = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, tokenize=False)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'ids': tok.encode('hello world'), 'chat': text}))"
    )
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(model_dir))
    assert loaded["torch"] is False
    assert loaded["ids"] == reference.encode("hello world")
    assert loaded["chat"] == reference.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                           tokenize=False)


def test_what_crosses_the_engine_door_pickles():
    """Requests in and results out are plain values a remote engine can receive and return."""
    import pickle

    import numpy as np

    from tinkerd.types import (
        AdamParams,
        AdapterRef,
        Datum,
        ForwardBackwardCall,
        LoraSpec,
        ModelInfo,
        SampledSequence,
        SampleRequest,
        SampleResult,
        SamplingParams,
        TokenEvent,
        TrainResult,
    )

    values = [
        ForwardBackwardCall("m", [Datum(np.arange(4), {"target_tokens": np.arange(1, 5)})], "cross_entropy", {"clip": 0.2}, False),
        SampleRequest([1, 2, 3], 2, SamplingParams(max_tokens=4, stop_strings=["\n"]), AdapterRef("k", "/tmp/x"), request_id="r"),
        TrainResult([{"logprobs": np.zeros(3, np.float32)}], {"loss:sum": 1.0}),
        SampleResult([SampledSequence([1], [-0.5], "stop")]),
        AdamParams(), LoraSpec(rank=4), ModelInfo("m", "/d", 8192, 49152, (2,)), TokenEvent(0, 5, -0.1, ((5, -0.1),)),
    ]
    for value in values:
        again = pickle.loads(pickle.dumps(value))
        assert type(again) is type(value)
        assert repr(again) == repr(value)


def test_the_door_vocabulary_holds_no_callables_or_tensors():
    """A callback or a tensor in a request type would tie the caller to an in-process engine."""
    import dataclasses

    import tinkerd.types as vocabulary

    classes = [c for c in vars(vocabulary).values() if dataclasses.is_dataclass(c)]
    assert len(classes) >= 10
    for cls in classes:
        for f in dataclasses.fields(cls):
            annotation = str(f.type)
            assert not any(word in annotation for word in ("Callable", "Tensor", "torch", "Engine", "Future")), (cls, f.name)
