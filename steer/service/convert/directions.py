"""Directions, Bake and Jobs service messages: artifact descriptions and files, and a job's
snapshot."""

from __future__ import annotations

from typing import Any

from steer.proto.v1 import directions_pb2, jobs_pb2
from steer.service.jobs import JobSnapshot
from steer.service.store import ArtifactFiles


def artifact_info(artifact_id: str, description: dict[str, Any]) -> directions_pb2.ArtifactInfo:
    return directions_pb2.ArtifactInfo(artifact_id=artifact_id, **description)


def broken_artifact(artifact_id: str, reason: str) -> directions_pb2.BrokenArtifact:
    return directions_pb2.BrokenArtifact(artifact_id=artifact_id, reason=reason)


def artifact_files(message: directions_pb2.ArtifactFiles) -> ArtifactFiles:
    return ArtifactFiles(message.artifact_id, message.vectors_safetensors, message.steer_json)


def artifact_files_message(files: ArtifactFiles) -> directions_pb2.ArtifactFiles:
    return directions_pb2.ArtifactFiles(
        artifact_id=files.artifact_id,
        vectors_safetensors=files.vectors_safetensors,
        steer_json=files.steer_json,
    )


def job(snapshot: JobSnapshot) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        job_id=snapshot.job_id,
        kind=snapshot.kind,
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{snapshot.state.name}"),
        stage=snapshot.stage,
        progress=snapshot.progress,
        result=snapshot.result,
        result_metadata=snapshot.result_metadata,
        error_code=snapshot.error_code,
        error=snapshot.error,
    )
