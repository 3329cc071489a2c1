"""The sglang adapter on CPU: a fake engine that records calls and answers in sglang's shapes, and a contract test
that reads the installed sglang's source with `ast` (its engine does not import without a GPU)."""

import ast
import importlib.util
import types
from pathlib import Path

import pytest
import torch

from opd.actors.engines.sglang import MEMORY_TAGS, SAMPLING_KEYS, SGLANG_CALLS, SGLangEngine, engine_kwargs
from opd.transport.sglang_weights import BUCKET_METADATA_FIELDS, DistributedUpdate, TensorBucketUpdate, flatten_bucket

EOS = 2


class FakeEngine:
    """Records every call (method, kwargs) in order and answers like sglang 0.5.23's Engine started with
    `skip_tokenizer_init=True`: generate gives {"output_ids", "meta_info"} per request (a list for a batch of
    input_ids), with `output_token_logprobs` as (logprob, token_id, None) and `finish_reason` as
    {"type": "stop", "matched": id} or {"type": "length", "length": n}; control calls give (success, message)."""

    def __init__(self, streams=(), *, trim_stop=False, finish=None, fail=None, probe=None, busy=0):
        self.streams = list(streams)  # per request, in order: the tokens the model would emit if never stopped
        self.trim_stop = trim_stop  # drop the stop token from output_ids (what sglang's detokenizer does)
        self.finish = finish  # force this finish_reason on every output
        self.fail = fail  # (method, nth call of it) answered (False, "boom")
        self.probe = probe  # called at each call; its value is recorded (e.g. the adapter's weight version)
        self.busy = busy  # flush_cache fails this many times (the scheduler not idle yet), then succeeds
        self.calls = []

    def _record(self, method, kwargs):
        self.calls.append((method, kwargs, self.probe() if self.probe else None))
        nth = sum(1 for m, _, _ in self.calls if m == method) - 1
        return (False, "boom") if self.fail == (method, nth) else (True, "Success")

    def generate(self, **kw):
        self._record("generate", kw)
        input_ids, params = kw["input_ids"], kw["sampling_params"]
        single = isinstance(input_ids[0], int)
        rows = [input_ids] if single else input_ids
        params = [params] * len(rows) if isinstance(params, dict) else params
        outs = []
        for row, p in zip(rows, params, strict=True):
            ids, finish = [], {"type": "length", "length": p["max_new_tokens"]}
            for tok in self.streams.pop(0):
                ids.append(tok)
                if tok in p["stop_token_ids"]:
                    finish = {"type": "stop", "matched": tok}
                    break
                if len(ids) == p["max_new_tokens"]:
                    break
            logprobs = [(-0.5 - 0.01 * t, t, None) for t in ids]
            if self.trim_stop and finish["type"] == "stop":
                ids = ids[:-1]
            outs.append({"output_ids": ids,
                         "meta_info": {"id": f"r{len(outs)}", "finish_reason": self.finish or finish,
                                       "prompt_tokens": len(row), "weight_version": "default",
                                       "output_token_logprobs": logprobs}})
        return outs[0] if single else outs

    def begin_weight_update(self):
        return self._record("begin_weight_update", {})

    def end_weight_update(self):
        return self._record("end_weight_update", {})

    def update_weights_from_tensor(self, **kw):
        return self._record("update_weights_from_tensor", kw)

    def update_weights_from_distributed(self, **kw):
        return self._record("update_weights_from_distributed", kw)

    def init_weights_update_group(self, **kw):
        return self._record("init_weights_update_group", kw)

    def destroy_weights_update_group(self, **kw):
        return self._record("destroy_weights_update_group", kw)

    def flush_cache(self):
        self._record("flush_cache", {})
        self.busy -= 1
        return types.SimpleNamespace(success=self.busy < 0)  # sglang's FlushCacheReqOutput

    def release_memory_occupation(self, **kw):
        # sglang asserts its scheduler is idle (the last batch included), which a successful flush shows
        flushed = [m for m, _, _ in self.calls if m == "flush_cache"]
        assert flushed and self.busy < 0, "release_memory_occupation while the scheduler is busy"
        self._record("release_memory_occupation", kw)  # sglang returns None here

    def resume_memory_occupation(self, **kw):
        self._record("resume_memory_occupation", kw)

    def shutdown(self):
        self._record("shutdown", {})

    def methods(self):
        return [m for m, _, _ in self.calls]


def _adapter(streams=(), **kw):
    fake_kw = {k: kw.pop(k) for k in ("trim_stop", "finish", "fail", "busy") if k in kw}
    fake = FakeEngine(streams, **fake_kw)
    engine = SGLangEngine(fake, eos_id=EOS, **kw)
    fake.probe = engine.weight_version
    return engine, fake


def test_fake_covers_the_call_table():
    assert set(SGLANG_CALLS) <= {m for m in dir(FakeEngine) if not m.startswith("_")}


# ---------------------------------------------------------------- generate


def test_generate_packs_a_rollout_batch_like_hf():
    streams = [[7, 8, EOS, 9], [7, 7, 7, 7, 7, 7], [EOS, 5], [6, EOS]]
    engine, fake = _adapter(streams)
    batch = engine.generate([[1, 3, 4], [4, 5]], num_samples=2, temperature=0.7, max_new_tokens=4)

    assert batch.prompts() == [[1, 3, 4], [1, 3, 4], [4, 5], [4, 5]]
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert batch.responses() == [[7, 8, EOS], [7, 7, 7, 7], [EOS], [6, EOS]]  # ends at and includes eos
    assert batch.response_lens.tolist() == [3, 4, 1, 2]
    assert batch.finish_reasons == ["stop", "length", "stop", "stop"]
    assert batch.logprobs.dtype == torch.float32
    want = torch.tensor([-0.5 - 0.01 * t for t in batch.response_ids.tolist()], dtype=torch.float32)
    assert torch.equal(batch.logprobs, want)
    assert batch.policy_version == -1

    (method, kw, _), = fake.calls
    assert method == "generate" and set(kw) == SGLANG_CALLS["generate"] and kw["return_logprob"] is True
    assert kw["input_ids"] == [[1, 3, 4], [1, 3, 4], [4, 5], [4, 5]]
    assert kw["sampling_params"] == [dict(max_new_tokens=4, temperature=0.7, top_p=1.0, top_k=-1,
                                          stop_token_ids=[EOS], no_stop_trim=True)] * 4


def test_sampling_params_greedy_and_top_k():
    engine, fake = _adapter([[5]] * 4)
    engine.generate([[1]], greedy=True, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=1)
    engine.generate([[1]], temperature=0.9, top_p=0.8, top_k=20, max_new_tokens=1)
    engine.generate([[1]], top_k=0, max_new_tokens=1)
    greedy, top_k, off = (kw["sampling_params"][0] for _, kw, _ in fake.calls)
    # sglang: temperature 0 is greedy (it sets top_k = 1 itself); top_k -1 is "no truncation"
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1)
    assert (top_k["temperature"], top_k["top_p"], top_k["top_k"]) == (0.9, 0.8, 20)
    assert off["top_k"] == -1
    with pytest.raises(ValueError, match="top_k"):
        engine.generate([[1]], top_k=-1, max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1]], temperature=0.0, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1]], max_new_tokens=0)


def test_seed_is_per_sample_in_deterministic_mode_and_warned_about_otherwise():
    engine, fake = _adapter([[5]] * 4, deterministic=True)
    engine.generate([[1], [3]], num_samples=2, max_new_tokens=1, seed=10)
    assert [p["sampling_seed"] for p in fake.calls[0][1]["sampling_params"]] == [10, 11, 12, 13]

    engine, fake = _adapter([[5]] * 2)
    with pytest.warns(UserWarning, match="enable_deterministic_inference"):
        engine.generate([[1]], num_samples=2, max_new_tokens=1, seed=10)
    assert all("sampling_seed" not in p for p in fake.calls[0][1]["sampling_params"])


def test_output_ids_must_match_the_logprob_entries():
    engine, _ = _adapter([[7, EOS]], trim_stop=True)
    with pytest.raises(AssertionError, match="output_token_logprobs"):
        engine.generate([[1]], max_new_tokens=4)


@pytest.mark.parametrize("finish", [{"type": "abort", "message": "x"}, {"type": "stop", "matched": "NaN happened"}])
def test_abnormal_finishes_stop_the_run(finish):
    engine, _ = _adapter([[7, EOS]], finish=finish)
    with pytest.raises(RuntimeError, match="sglang"):
        engine.generate([[1]], max_new_tokens=4)


# ---------------------------------------------------------------- weights


def _named(n, size=3):
    return [(f"p{i}", torch.full((size,), float(i))) for i in range(n)]


def test_tensor_buckets_one_call_each_flush_on_the_last_version_after():
    engine, fake = _adapter()
    buckets = [_named(2), _named(1), _named(3)]
    assert engine.load_weights(TensorBucketUpdate(version=4, buckets=buckets, load_format=None)) == 4
    assert fake.methods() == ["begin_weight_update"] + ["update_weights_from_tensor"] * 3 + ["end_weight_update"]
    updates = [(kw, seen) for m, kw, seen in fake.calls if m == "update_weights_from_tensor"]
    assert [kw["flush_cache"] for kw, _ in updates] == [False, False, True]
    assert [kw["load_format"] for kw, _ in updates] == [None] * 3
    for (kw, seen), bucket in zip(updates, buckets, strict=True):
        assert [n for n, _ in kw["named_tensors"]] == [n for n, _ in bucket]  # in order
        assert seen == -1  # the version changes only after every call returned
    assert engine.weight_version() == 4


def test_flattened_buckets_are_encoded_or_passed_through():
    encoded = []

    def encode(bucket, tp_size):
        encoded.append(([n for n, _ in bucket], tp_size))
        return [f"payload-{len(encoded)}".encode()] * tp_size

    engine, fake = _adapter(encode_bucket=encode)
    engine.load_weights(TensorBucketUpdate(version=1, buckets=[_named(2), _named(1)]))
    assert encoded == [(["p0", "p1"], 1), (["p0"], 1)]
    sent = [kw for m, kw, _ in fake.calls if m == "update_weights_from_tensor"]
    assert [kw["named_tensors"] for kw in sent] == [[b"payload-1"], [b"payload-2"]]
    assert all(kw["load_format"] == "flattened_bucket" for kw in sent)

    # payloads the producer serialised (CUDA IPC handles made in the learner) go through untouched
    engine.load_weights(TensorBucketUpdate(version=2, buckets=[[b"ipc-0"]]))
    assert fake.calls[-2][1]["named_tensors"] == [b"ipc-0"] and len(encoded) == 2
    with pytest.raises(ValueError, match="one payload per TP rank"):
        engine.load_weights(TensorBucketUpdate(version=3, buckets=[[b"a", b"b"]]))
    assert fake.methods()[-1] == "end_weight_update" and engine.weight_version() == 2


def test_a_failed_bucket_closes_the_session_and_keeps_the_version():
    engine, fake = _adapter(fail=("update_weights_from_tensor", 1))
    with pytest.raises(RuntimeError, match="bucket 2 of 3.*boom"):
        engine.load_weights(TensorBucketUpdate(version=7, buckets=[_named(1)] * 3, load_format=None))
    assert fake.methods() == ["begin_weight_update", "update_weights_from_tensor", "update_weights_from_tensor",
                              "end_weight_update"]
    assert engine.weight_version() == -1


def test_distributed_update_and_group():
    engine, fake = _adapter()
    engine.init_weights_group("10.0.0.1", 29500, rank_offset=1, world_size=2, group_name="opd")
    update = DistributedUpdate(version=3, names=("a", "b"), dtypes=(torch.bfloat16, "float32"),
                               shapes=((2, 3), (4,)), group_name="opd")
    assert engine.load_weights(update) == 3
    assert fake.methods() == ["init_weights_update_group", "begin_weight_update", "update_weights_from_distributed",
                              "end_weight_update"]
    assert fake.calls[0][1] == dict(master_address="10.0.0.1", master_port=29500, rank_offset=1, world_size=2,
                                    group_name="opd", backend="nccl")
    assert fake.calls[2][1] == dict(names=["a", "b"], dtypes=["bfloat16", "float32"], shapes=[[2, 3], [4]],
                                    group_name="opd", flush_cache=True, load_format=None)
    assert fake.calls[2][2] == -1 and engine.weight_version() == 3
    with pytest.raises(ValueError, match="equally long"):
        DistributedUpdate(version=1, names=("a",), dtypes=(), shapes=((1,),), group_name="g")


def test_update_validation():
    with pytest.raises(ValueError, match="load_format"):
        TensorBucketUpdate(version=1, buckets=[_named(1)], load_format="bogus")
    with pytest.raises(ValueError, match="DistributedUpdate.load_format='direct'"):
        DistributedUpdate(version=1, names=("a",), dtypes=("float32",), shapes=((1,),), group_name="g",
                          load_format="direct")
    with pytest.raises(ValueError, match="bucket"):
        TensorBucketUpdate(version=1, buckets=[])
    engine, fake = _adapter()
    with pytest.raises(TypeError):
        engine.load_weights(object())
    assert fake.calls == []
    with pytest.raises(ValueError, match="mem_fraction_static"):
        engine_kwargs("m", mem_fraction_static=1.5)


# ---------------------------------------------------------------- memory


def test_release_and_resume_in_the_order_that_works():
    # slime's order: generate -> release all -> (train) -> resume weights -> sync -> resume kv_cache, cuda_graph
    engine, fake = _adapter([[5], [5]], encode_bucket=lambda b, tp: [b"x"] * tp)
    engine.generate([[1]], max_new_tokens=1)
    engine.release_memory()
    engine.resume_memory(["weights"])
    engine.load_weights(TensorBucketUpdate(version=1, buckets=[_named(1)]))
    engine.resume_memory()  # the rest
    assert engine.generate([[1]], max_new_tokens=1).policy_version == 1
    assert [(m, kw.get("tags")) for m, kw, _ in fake.calls] == [
        ("generate", None), ("flush_cache", None),
        ("release_memory_occupation", ["weights", "kv_cache", "cuda_graph"]),
        ("resume_memory_occupation", ["weights"]),
        ("begin_weight_update", None), ("update_weights_from_tensor", None), ("end_weight_update", None),
        ("resume_memory_occupation", ["kv_cache", "cuda_graph"]),
        ("generate", None)]
    engine.resume_memory()  # nothing released: no call
    engine.release_memory(["kv_cache"])
    engine.release_memory()  # only what is still held
    assert [kw.get("tags") for _, kw, _ in fake.calls[-4:]] == [None, ["kv_cache"], None, ["weights", "cuda_graph"]]
    with pytest.raises(ValueError, match="memory tags"):
        engine.release_memory(["kv"])


def test_a_release_waits_for_an_idle_scheduler(monkeypatch):
    """sglang asserts its scheduler is idle on a release, which it may not be right after the last output:
    flush_cache until it succeeds, then release; a scheduler that never goes idle is an error, with no release."""
    engine, fake = _adapter([[5]], busy=2)
    engine.generate([[1]], max_new_tokens=1)
    engine.release_memory(["kv_cache"])
    assert fake.methods() == ["generate", "flush_cache", "flush_cache", "flush_cache", "release_memory_occupation"]
    monkeypatch.setattr("opd.actors.engines.sglang.FLUSH_TRIES", 3)
    monkeypatch.setattr("opd.actors.engines.sglang.FLUSH_WAIT_S", 0.0)
    engine, fake = _adapter([[5]], busy=10)
    with pytest.raises(RuntimeError, match="did not go idle"):
        engine.release_memory()
    assert fake.methods() == ["flush_cache"] * 3 and engine._memory.released == set()
    # on the CPU (releases_memory=False) the release is ordered and waited for, but not sent
    engine, fake = _adapter([[5]], releases_memory=False)
    engine.release_memory()
    with pytest.raises(RuntimeError, match="released"):
        engine.generate([[1]], max_new_tokens=1)
    engine.resume_memory()
    assert fake.methods() == ["flush_cache"]


def test_misordered_calls_are_refused():
    engine, _ = _adapter([[5]])
    engine.release_memory(["kv_cache"])
    with pytest.raises(RuntimeError, match="released"):
        engine.generate([[1]], max_new_tokens=1)
    engine.release_memory(["weights"])
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.load_weights(TensorBucketUpdate(version=1, buckets=[_named(1)], load_format=None))
    engine.resume_memory()
    with pytest.raises(RuntimeError, match="undefined"):  # released weights come back without their values
        engine.generate([[1]], max_new_tokens=1)
    engine.load_weights(TensorBucketUpdate(version=1, buckets=[_named(1)], load_format=None))
    engine.generate([[1]], max_new_tokens=1)


def test_weights_survive_release_with_a_cpu_backup():
    engine, _ = _adapter([[5]], weights_cpu_backup=True)
    engine.release_memory()
    engine.resume_memory()
    engine.generate([[1]], max_new_tokens=1)


# ---------------------------------------------------------------- against the installed sglang's source

SGLANG = importlib.util.find_spec("sglang")  # finds the package without importing it
needs_sglang = pytest.mark.skipif(SGLANG is None, reason="sglang not installed (pip install --no-deps sglang)")


def _src(rel: str) -> Path:
    return Path(SGLANG.submodule_search_locations[0]) / rel


def _class(rel: str, name: str) -> ast.ClassDef:
    tree = ast.parse(_src(rel).read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name]
    assert found, f"no class {name} in sglang/{rel}"
    return found[0]


def _annotated_fields(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


@needs_sglang
def test_engine_methods_accept_what_the_adapter_passes():
    engine = _class("srt/entrypoints/engine.py", "Engine")
    methods = {n.name: n for n in engine.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for method, keywords in SGLANG_CALLS.items():
        assert method in methods, f"sglang's Engine has no method {method}"
        args = methods[method].args
        accepted = {a.arg for a in args.args + args.kwonlyargs}
        missing = set(keywords) - accepted
        assert not missing or args.kwarg is not None, f"Engine.{method} does not accept {sorted(missing)}"
        required = [a.arg for a in args.args[1:len(args.args) - len(args.defaults)]]
        assert set(required) <= set(keywords), f"Engine.{method} requires {required}, the adapter passes {keywords}"


@needs_sglang
def test_sampling_params_server_args_and_tags_exist():
    assert SAMPLING_KEYS <= _annotated_fields(_class("srt/sampling/sampling_params.py", "SamplingParams"))
    server_fields = set()
    for path in _src("srt/arg_groups/fields").glob("*.py"):
        for cls in ast.walk(ast.parse(path.read_text())):
            if isinstance(cls, ast.ClassDef):
                server_fields |= _annotated_fields(cls)
    keys = (set(engine_kwargs("m", mem_fraction_static=0.5)) | {"enable_weights_cpu_backup"}
            | set(engine_kwargs("/", mem_fraction_static=0.5, device="cpu")))  # a folder without weights: dummy
    assert {"load_format", "attention_backend", "max_total_tokens", "device", "base_gpu_id"} <= keys
    # the actor's GPU under RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES (actor_device): sglang's base GPU
    assert engine_kwargs("m", mem_fraction_static=0.5, gpu_id=3)["base_gpu_id"] == 3
    assert keys <= server_fields, f"not sglang server arguments: {sorted(keys - server_fields)}"
    constants = _src("srt/constants.py").read_text()
    assert all(f'"{tag}"' in constants for tag in MEMORY_TAGS)


@needs_sglang
def test_flattened_bucket_format():
    meta = _class("srt/weight_sync/tensor_bucket.py", "FlattenedTensorMetadata")
    assert tuple(n.target.id for n in meta.body if isinstance(n, ast.AnnAssign)) == BUCKET_METADATA_FIELDS
    bucket = _class("srt/weight_sync/tensor_bucket.py", "FlattenedTensorBucket")
    assert {"get_flattened_tensor", "get_metadata", "reconstruct_tensors"} <= {
        n.name for n in bucket.body if isinstance(n, ast.FunctionDef)}
    serializer = _class("srt/utils/common.py", "MultiprocessingSerializer")
    assert "serialize" in {n.name for n in serializer.body if isinstance(n, ast.FunctionDef)}
    # the scheduler's safe unpickler must accept the metadata class; its loader reads these two keys
    allowed = '("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")'
    assert allowed in _src("srt/utils/common.py").read_text()
    updater = _src("srt/model_executor/model_runner_components/weight_updater.py").read_text()
    assert '["flattened_tensor"]' in updater and '["metadata"]' in updater


@needs_sglang
def test_output_shape_the_fake_mirrors():
    manager = _src("srt/managers/tokenizer_manager.py").read_text()
    for key in ('"output_ids"', '"meta_info"', '"finish_reason"', '"output_token_logprobs"',
                "(logprob, token_id, None)"):
        assert key in manager, key
    batch = _src("srt/managers/schedule_batch.py").read_text()
    assert '"type": "stop"' in batch and '"type": "length"' in batch


@needs_sglang
def test_flatten_bucket_round_trips_through_sglangs_bucket():
    # tensor_bucket.py imports only torch: load the file itself (importing the sglang package fails on CPU)
    spec = importlib.util.spec_from_file_location("sglang_tensor_bucket", _src("srt/weight_sync/tensor_bucket.py"))
    tb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tb)

    flat_fp32 = torch.arange(17, dtype=torch.float32)
    views = [("a", flat_fp32[:6].view(2, 3)), ("b", flat_fp32[6:10]), ("c", flat_fp32[10:17].view(7, 1))]
    flat, metadata = flatten_bucket(views, tb.FlattenedTensorMetadata)
    assert flat.dtype == torch.uint8 and flat.data_ptr() == flat_fp32.data_ptr()  # consecutive views: zero copy
    scattered = [("x", torch.randn(3, 2)), ("y", torch.randn(6).to(torch.bfloat16)), ("z", torch.randn(4)[::2])]
    flat2, metadata2 = flatten_bucket(scattered, tb.FlattenedTensorMetadata)
    reference = tb.FlattenedTensorBucket(named_tensors=[(n, t.contiguous()) for n, t in scattered])
    assert torch.equal(flat2, reference.get_flattened_tensor()) and metadata2 == reference.get_metadata()
    for named, (f, m) in ((views, (flat, metadata)), (scattered, (flat2, metadata2))):
        rebuilt = tb.FlattenedTensorBucket(flattened_tensor=f, metadata=m).reconstruct_tensors()
        assert [n for n, _ in rebuilt] == [n for n, _ in named]
        for (_, got), (_, want) in zip(rebuilt, named, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
    # 5 bf16 values end at byte 34: the fp32 after them could not be viewed back (sglang fails at the receiver)
    misaligned = [("x", torch.randn(3, 2)), ("y", torch.randn(5).to(torch.bfloat16)), ("z", torch.randn(2))]
    with pytest.raises(ValueError, match="starts at byte 34"):
        flatten_bucket(misaligned, tb.FlattenedTensorMetadata)


@needs_sglang
def test_split_mode_learner_side_matches_sglangs_receiver():
    """split + sglang: the learner joins sglang's weight-update group with sglang's own helper and broadcasts
    each bucket as the bytes sglang's receiver allocates (FlattenedTensorBucket.empty: consecutive, unpadded)."""
    tree = ast.parse(_src("srt/utils/common.py").read_text())
    helper = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "init_custom_process_group"]
    assert helper and {"backend", "init_method", "world_size", "rank", "group_name"} <= {
        a.arg for a in helper[0].args.args}
    assert "from sglang.srt.utils.common import *" in _src("srt/utils/__init__.py").read_text()
    bucket = _class("srt/weight_sync/tensor_bucket.py", "FlattenedTensorBucket")
    assert "empty" in {n.name for n in bucket.body if isinstance(n, ast.FunctionDef)}
    updater = _src("srt/model_executor/model_runner_components/weight_updater.py").read_text()
    assert "def _receive_bucketed_weights_from_distributed" in updater and "FlattenedTensorBucket.empty" in updater


def test_distributed_update_in_buckets():
    engine, fake = _adapter()
    update = DistributedUpdate(version=4, names=("a", "b", "c"), dtypes=(torch.bfloat16,) * 3,
                               shapes=((2,), (3,), (4,)), group_name="opd", load_format="flattened_bucket",
                               bucket_sizes=[2, 1])
    assert engine.load_weights(update) == 4
    assert fake.methods() == ["begin_weight_update", "update_weights_from_distributed",
                              "update_weights_from_distributed", "end_weight_update"]
    assert [c[1]["names"] for c in fake.calls[1:3]] == [["a", "b"], ["c"]]
    assert [c[1]["flush_cache"] for c in fake.calls[1:3]] == [False, True]  # flushed once, after the last
    with pytest.raises(ValueError, match="add up to the 3 names"):
        DistributedUpdate(version=1, names=("a", "b", "c"), dtypes=(torch.bfloat16,) * 3, shapes=((1,),) * 3,
                          group_name="g", bucket_sizes=[1, 1])


def _rollout_actor_with_fake(mode, streams=()):
    """A RolloutActor whose engine is the adapter around the fake (SGLangEngine.from_config needs a GPU)."""
    import dataclasses

    from opd.actors.rollout import RolloutActor
    from opd.modes import weight_route
    from opd.presets import preset

    cfg = preset("tiny_cpu")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, mode=mode),
                              rollout=dataclasses.replace(cfg.rollout, engine="sglang", max_new_tokens=3))
    actor = object.__new__(RolloutActor)
    actor.cfg, actor.replica, actor.sglang = cfg, 1, True
    actor.weights = weight_route(cfg)  # as RolloutActor.__init__ chooses it
    actor.engine, fake = _adapter(streams)
    return actor, fake


@pytest.mark.filterwarnings("ignore:SGLangEngine.generate. seed is ignored")
def test_rollout_actor_sync_and_memory_order_with_sglang():
    from opd.transport.weights import BroadcastSpec, FlatLayout, WeightUpdate

    actor, fake = _rollout_actor_with_fake("colocated", streams=[[5, 6, 7], [8, EOS]])
    assert actor.load_weights(WeightUpdate(1, sglang_buckets=(["payload-0"], ["payload-1"]))) == 1
    batch = actor.generate([[1, 2], [3]], seed=0)
    assert batch.policy_version == 1 and batch.responses() == [[5, 6, 7], [8, EOS]]
    # generate, then hand the KV cache and CUDA graphs back; resumed before the next generate
    fake.streams.append([9, EOS])
    actor.generate([[1]], seed=0)
    assert fake.methods() == ["begin_weight_update", "update_weights_from_tensor", "update_weights_from_tensor",
                              "end_weight_update", "generate", "flush_cache", "release_memory_occupation",
                              "resume_memory_occupation", "generate", "flush_cache", "release_memory_occupation"]
    assert fake.calls[1][1]["named_tensors"] == ["payload-0"] and fake.calls[6][1] == {"tags": ["kv_cache", "cuda_graph"]}

    actor, fake = _rollout_actor_with_fake("split")
    layout = FlatLayout(("a", "b", "c"), ((2,), (3,), (4,)), (0, 2, 5), 9)
    spec = BroadcastSpec(layout, torch.bfloat16, (range(0, 2), range(2, 3)), "opd-weights")
    actor.join_sglang_group("10.0.0.1", 29500, 2, "opd-weights")
    assert actor.load_weights(WeightUpdate(7, broadcast=spec)) == 7
    assert fake.calls[0][1]["rank_offset"] == 2  # replica 1 is rank 2 (the learner is 0)
    sent = [c[1] for c in fake.calls if c[0] == "update_weights_from_distributed"]
    assert [c["names"] for c in sent] == [["a", "b"], ["c"]] and {c["load_format"] for c in sent} == {"flattened_bucket"}
