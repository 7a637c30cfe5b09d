"""A minimal agent object with every top-level key of Letta's AgentState (agent_create.json)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tracker.sim_shapes import USER_ID, iso_z

DEFAULT_MODEL = "openai-proxy/fake-model"
SYSTEM = "<base_instructions>\nYou are a helpful agent (Letta simulator).\n</base_instructions>"


def agent_json(
    agent_id: str, name: str, model: str, agent_type: str, created: datetime, message_id: str
) -> dict[str, Any]:
    """The AgentState Letta serves for a fresh agent; tools and blocks left empty."""
    stamp = iso_z(created)
    return {
        "created_by_id": USER_ID,
        "last_updated_by_id": USER_ID,
        "created_at": stamp,
        "updated_at": stamp,
        "id": agent_id,
        "name": name,
        "tool_rules": [],
        "message_ids": [message_id],
        "system": SYSTEM,
        "agent_type": agent_type,
        "llm_config": _llm_config(model),
        "embedding_config": None,
        "model": model,
        "embedding": None,
        "model_settings": _model_settings(),
        "compaction_settings": _compaction_settings(),
        "response_format": None,
        "description": None,
        "metadata": None,
        "memory": _memory(agent_type),
        "blocks": [],
        "tools": [],
        "sources": [],
        "tags": [],
        "tool_exec_environment_variables": [],
        "secrets": [],
        "project_id": None,
        "template_id": None,
        "base_template_id": None,
        "deployment_id": None,
        "entity_id": None,
        "identity_ids": [],
        "identities": [],
        "pending_approval": None,
        "message_buffer_autoclear": False,
        "enable_sleeptime": None,
        "multi_agent_group": None,
        "managed_group": None,
        "last_run_completion": None,
        "last_run_duration_ms": None,
        "last_stop_reason": None,
        "timezone": "UTC",
        "max_files_open": 5,
        "per_file_view_window_char_limit": 15000,
        "hidden": None,
    }


def _llm_config(handle: str) -> dict[str, Any]:
    return {
        "model": handle.rsplit("/", 1)[-1],
        "display_name": None,
        "model_endpoint_type": "openai",
        "model_endpoint": "http://127.0.0.1:8399/v1",
        "provider_name": "openai",
        "provider_category": "base",
        "model_wrapper": None,
        "context_window": 30000,
        "put_inner_thoughts_in_kwargs": False,
        "handle": handle,
        "temperature": 1.0,
        "max_tokens": 16384,
        "enable_reasoner": False,
        "reasoning_effort": None,
        "max_reasoning_tokens": 0,
        "effort": None,
        "frequency_penalty": None,
        "compatibility_type": None,
        "verbosity": None,
        "tier": None,
        "parallel_tool_calls": False,
        "response_format": None,
        "strict": False,
        "return_logprobs": False,
        "top_logprobs": None,
        "return_token_ids": False,
        "tool_call_parser": None,
    }


def _model_settings() -> dict[str, Any]:
    return {
        "max_output_tokens": 16384,
        "parallel_tool_calls": True,
        "provider_type": "openai",
        "temperature": 1.0,
        "reasoning": {"reasoning_effort": "minimal"},
        "response_format": None,
        "strict": False,
    }


def _compaction_settings() -> dict[str, Any]:
    return {
        "model": "openai/gpt-5-mini",
        "model_settings": None,
        "prompt": "Summarize the evicted messages.",
        "prompt_acknowledgement": False,
        "clip_chars": 50000,
        "mode": "sliding_window",
        "sliding_window_percentage": 0.3,
    }


def _memory(agent_type: str) -> dict[str, Any]:
    return {
        "agent_type": agent_type,
        "git_enabled": False,
        "blocks": [],
        "file_blocks": [],
        "prompt_template": "",
    }
