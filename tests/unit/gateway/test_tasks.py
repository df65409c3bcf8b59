"""AddTask / ListTasks / RemoveTask: adapter validation, duplicates, the quantizer hook."""
from __future__ import annotations

import grpc
import pytest

from services.common.errors import InvalidArgumentError
from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from tests.unit.gateway.conftest import write_lora


async def _fails(coro) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code(), info.value.details()


async def test_add_list_remove_roundtrip(gateway, tmp_path):
    path = write_lora(tmp_path / "a", rank=4, modules=("q_proj", "v_proj"))
    version = await gateway.registry.version()
    added = await gateway.stub.AddTask(gateway_pb2.AddTaskRequest(name="sql", adapter_path=str(path)))
    assert added.task.rank == 4 and list(added.task.target_modules) == ["q_proj", "v_proj"]
    assert added.task.state == common_pb2.TASK_STATE_READY and added.task.weight == 1.0
    assert await gateway.registry.version() == version + 1
    await gateway.queue.client.lpush(gateway.queue.keys.stats("sql"), 10, 30, 20)
    listed = await gateway.stub.ListTasks(gateway_pb2.ListTasksRequest())
    [info] = listed.tasks
    assert info.name == "sql" and info.adapter_path == str(path.resolve())
    assert info.num_finished == 3 and info.median_output_tokens == 20
    await gateway.stub.RemoveTask(gateway_pb2.RemoveTaskRequest(name="sql"))
    assert (await gateway.stub.ListTasks(gateway_pb2.ListTasksRequest())).tasks == []
    code, _ = await _fails(gateway.stub.RemoveTask(gateway_pb2.RemoveTaskRequest(name="sql")))
    assert code is grpc.StatusCode.NOT_FOUND


async def test_duplicate_name_is_already_exists(gateway, tmp_path):
    path = str(write_lora(tmp_path / "a"))
    await gateway.stub.AddTask(gateway_pb2.AddTaskRequest(name="t", adapter_path=path))
    code, _ = await _fails(gateway.stub.AddTask(gateway_pb2.AddTaskRequest(name="t",
                                                                           adapter_path=path)))
    assert code is grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("make,needle", [
    (lambda p: p, "missing adapter_model.safetensors"),                  # empty directory
    (lambda p: write_lora(p, hidden=64), "do not fit the base model"),   # another base model
    (lambda p: write_lora(p, layers=(40,)), "layer 40"),
    (lambda p: write_lora(p, rank=4, config_rank=8), "r=8"),
    (lambda p: write_lora(p, rank=128), "max LoRA rank"),
])
async def test_malformed_adapter_is_invalid_argument_with_reason(gateway, tmp_path, make, needle):
    path = tmp_path / "bad"
    path.mkdir()
    make(path)
    code, details = await _fails(gateway.stub.AddTask(
        gateway_pb2.AddTaskRequest(name="bad", adapter_path=str(path))))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and needle in details
    assert await gateway.registry.get("bad") is None


async def test_bad_names_and_weights(gateway, tmp_path):
    path = str(write_lora(tmp_path / "a"))
    for request in (gateway_pb2.AddTaskRequest(name="a b", adapter_path=path),
                    gateway_pb2.AddTaskRequest(name="ok", adapter_path=""),
                    gateway_pb2.AddTaskRequest(name="ok", adapter_path=path, weight=-1)):
        code, _ = await _fails(gateway.stub.AddTask(request))
        assert code is grpc.StatusCode.INVALID_ARGUMENT


async def test_calibration_without_quantizer_is_failed_precondition(gateway, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"prompt": "a", "completion": "b"}\n')
    request = gateway_pb2.AddTaskRequest(name="q", adapter_path=str(write_lora(tmp_path / "a")),
                                         calibration_path=str(calib))
    code, details = await _fails(gateway.stub.AddTask(request))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "no quantizer configured" in details


class _Quantizer:
    def __init__(self, error: Exception | None = None) -> None:
        self.jobs: list[tuple[str, str, str]] = []
        self.settings: list[tuple[int, int]] = []
        self.error = error

    async def start_job(self, name: str, adapter_path: str, calibration_path: str,
                        bits: int = 0, group_size: int = 0) -> str:
        if self.error is not None:
            raise self.error
        self.jobs.append((name, adapter_path, calibration_path))
        self.settings.append((bits, group_size))
        return "job-1"

    async def close(self) -> None:
        pass


async def test_calibration_starts_quantizer_job(make_gateway, gateway_config, tmp_path):
    quantizer = _Quantizer()
    gateway = await make_gateway(gateway_config, quantizer=quantizer)
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"prompt": "a", "completion": "b"}\n')
    request = gateway_pb2.AddTaskRequest(name="q", adapter_path=str(write_lora(tmp_path / "a")),
                                         calibration_path=str(calib))
    response = await gateway.stub.AddTask(request)
    assert response.job_id == "job-1" and quantizer.jobs[0][2] == str(calib)
    assert response.task.state == common_pb2.TASK_STATE_QUANTIZING
    # A job the quantizer refuses leaves no half-registered task behind.
    quantizer.error = InvalidArgumentError("calibration file has no rows")
    request.name = "q2"
    code, details = await _fails(gateway.stub.AddTask(request))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "no rows" in details
    assert await gateway.registry.get("q2") is None


async def test_quant_settings_checked_before_registering(make_gateway, gateway_config, tmp_path):
    quantizer = _Quantizer()
    gateway = await make_gateway(gateway_config, quantizer=quantizer)
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"prompt": "a", "completion": "b"}\n')
    adapter = str(write_lora(tmp_path / "a"))
    cases = [({"calibration_path": str(calib), "quant_bits": 5}, "quant_bits=5"),
             ({"calibration_path": str(calib), "quant_bits": -1}, "quant_bits=-1"),
             ({"calibration_path": str(calib), "quant_group_size": -7}, "quant_group_size=-7"),
             ({"quant_bits": 4}, "need calibration_path"),
             ({"quant_group_size": 64}, "need calibration_path")]
    for i, (fields, needle) in enumerate(cases):
        request = gateway_pb2.AddTaskRequest(name=f"s{i}", adapter_path=adapter, **fields)
        code, details = await _fails(gateway.stub.AddTask(request))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and needle in details, (fields, details)
        assert await gateway.registry.get(f"s{i}") is None
    assert quantizer.jobs == []
    request = gateway_pb2.AddTaskRequest(name="ok", adapter_path=adapter,
                                         calibration_path=str(calib), quant_bits=8,
                                         quant_group_size=64)
    assert (await gateway.stub.AddTask(request)).job_id == "job-1"
    assert quantizer.settings == [(8, 64)]


async def test_outlier_adapter_is_quarantined_and_not_served(gateway, tmp_path):
    """Screening runs before a task is served or joins quantization; a quarantined task
    is registered (visible to its owner, with the reason) but Generate refuses it."""
    from safetensors.torch import load_file, save_file

    path = write_lora(tmp_path / "poison", rank=4, layers=tuple(range(8)))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    victim = "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"
    tensors[victim] = tensors[victim] * 1e5  # one module's update dwarfs the base weight
    save_file(tensors, str(path / "adapter_model.safetensors"))
    added = await gateway.stub.AddTask(gateway_pb2.AddTaskRequest(name="poison",
                                                                  adapter_path=str(path)))
    assert added.task.state == common_pb2.TASK_STATE_QUARANTINED
    assert "layers.3.self_attn.q_proj" in added.task.message
    request = gateway_pb2.GenerateRequest(task="poison", prompt="hi",
                                          params=common_pb2.SamplingParams(max_tokens=4))
    code, details = await _fails(_drain(gateway.stub.Generate(request)))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "QUARANTINED" in details
    assert await gateway.queue.backlog() == 0


async def test_clean_adapter_passes_screening(gateway, tmp_path):
    path = write_lora(tmp_path / "clean", rank=4, layers=tuple(range(8)))
    added = await gateway.stub.AddTask(gateway_pb2.AddTaskRequest(name="clean",
                                                                  adapter_path=str(path)))
    assert added.task.state == common_pb2.TASK_STATE_READY


async def _drain(call) -> None:
    async for _ in call:
        pass


async def test_remove_task_drops_its_length_statistics(gateway, tmp_path):
    request = gateway_pb2.AddTaskRequest(name="stats", adapter_path=str(write_lora(tmp_path / "a")))
    await gateway.stub.AddTask(request)
    key = gateway.queue.keys.stats("stats")
    await gateway.queue.client.lpush(key, 5, 7)
    await gateway.stub.RemoveTask(gateway_pb2.RemoveTaskRequest(name="stats"))
    assert not await gateway.queue.client.exists(key)
