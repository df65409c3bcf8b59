"""QuantizerServicer over a JobManager: a job adds a task and publishes v2; bad input rejected."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.pb.inlaid.v1 import quantizer_pb2
from services.quantizer.checkpoint import load_checkpoint
from services.quantizer.config import QuantConfig
from services.quantizer.jobs import JobManager
from services.quantizer.pipeline import quantize
from services.quantizer.servicer import QuantizerServicer


async def test_job_adds_task_and_reports_progress(tiny_model, tiny_tasks, tmp_path):
    root = tmp_path / "q"
    quantize(str(tiny_model), tiny_tasks[:1], QuantConfig(num_seqs=2, seq_len=32, group_size=32), root,
             show_progress=False)
    servicer = QuantizerServicer(JobManager(root))
    t = tiny_tasks[1]
    resp = await servicer.StartJob(quantizer_pb2.StartJobRequest(tasks=[quantizer_pb2.QuantTask(
        name=t.name, adapter_path=t.adapter_path, calibration_path=t.calibration_path)]), None)
    servicer.jobs.get(resp.job_id).done.wait(120)
    job = await servicer.GetJob(quantizer_pb2.GetJobRequest(job_id=resp.job_id), None)
    assert job.state == quantizer_pb2.JOB_STATE_DONE, job.message
    assert job.weight_version == 2 and job.num_layers_done == job.num_layers_total == 2
    assert [x["name"] for x in load_checkpoint(root).quant_config["tasks"]] == ["alpha", "beta"]
    # Same task again: the job fails, the served version stays v2.
    again = await servicer.StartJob(quantizer_pb2.StartJobRequest(tasks=[quantizer_pb2.QuantTask(
        name=t.name, adapter_path=t.adapter_path, calibration_path=t.calibration_path)]), None)
    servicer.jobs.get(again.job_id).done.wait(60)
    failed = await servicer.GetJob(quantizer_pb2.GetJobRequest(job_id=again.job_id), None)
    assert failed.state == quantizer_pb2.JOB_STATE_FAILED and "beta" in failed.message
    assert load_checkpoint(root).path.name == "v2"


async def test_bad_requests(tmp_path):
    servicer = QuantizerServicer(JobManager(tmp_path))
    with pytest.raises(InvalidArgumentError):
        await servicer.StartJob(quantizer_pb2.StartJobRequest(), None)
    with pytest.raises(InvalidArgumentError):
        await servicer.StartJob(quantizer_pb2.StartJobRequest(tasks=[quantizer_pb2.QuantTask(name="x")]), None)
    with pytest.raises(NotFoundError):
        await servicer.GetJob(quantizer_pb2.GetJobRequest(job_id="nope"), None)
