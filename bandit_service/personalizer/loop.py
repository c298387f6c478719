"""One Personalizer *loop* = one policy of the running service: read and change its settings.

Changes are serialised by a lock, validated as a whole, written to the policy file
atomically and applied to the running service at once (other processes pick the file up
on their next reload). See :mod:`bandit_service.personalizer.configuration`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import tomllib
from typing import Any

from sqlalchemy.orm import Session

from bandit_service.errors import NotFound
from bandit_service.personalizer import configuration as cfg
from bandit_service.policy import PolicyConfig, PolicyError, check_vw_args, parse_policy
from bandit_service.service import DecisionService


class PersonalizerLoop:
    def __init__(self, service: DecisionService, policy_name: str) -> None:
        self.service = service
        self.name = policy_name
        self._lock = asyncio.Lock()

    def policy(self) -> PolicyConfig:
        policy = self.service.policies.get(self.name)
        if policy is None:
            raise NotFound(
                f"the Personalizer loop's policy {self.name!r} is not configured "
                "(BANDIT_PERSONALIZER_POLICY names a policy file in BANDIT_POLICIES_DIR)"
            )
        return policy

    async def _state(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            with Session(self.service.db) as session:
                return cfg.load_state(session, self.name)

        return await asyncio.to_thread(read)

    async def _save_state(self, state: dict[str, Any]) -> None:
        def write() -> None:
            with Session(self.service.db) as session, session.begin():
                cfg.save_state(session, self.name, state)

        await asyncio.to_thread(write)

    # -- reads -------------------------------------------------------------------------------
    async def service_configuration(self) -> dict[str, Any]:
        policy = self.policy()
        state = await self._state()
        return cfg.service_configuration(policy, state, self.service.settings.model_reload_seconds)

    async def policy_contract(self) -> dict[str, Any]:
        policy = self.policy()
        return cfg.policy_contract(policy, await self._state())

    # -- writes ------------------------------------------------------------------------------
    async def update_service_configuration(self, body: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            policy = self.policy()
            updates = cfg.policy_updates(body, policy, self.service.settings.model_reload_seconds)
            facade = cfg.facade_updates(body)
            await self._change(policy, updates, facade)
        return await self.service_configuration()

    async def update_policy(self, name: str | None, arguments: str) -> dict[str, Any]:
        async with self._lock:
            policy = self.policy()
            try:
                check_vw_args(arguments, "arguments")
            except PolicyError as exc:
                raise cfg.ConfigurationError("arguments", str(exc).split(": ", 1)[-1]) from None
            updates = {"vw_args": arguments} if arguments != policy.vw_args else {}
            await self._change(policy, updates, {"policyName": name} if name else {})
        return await self.policy_contract()

    async def reset_policy(self) -> dict[str, Any]:
        """Personalizer's default learning settings, keeping the current exploration."""
        epsilon = cfg.exploration_of(self.policy().vw_args) or cfg.VW_DEFAULT_EPSILON
        arguments = cfg.DEFAULT_ARGUMENTS.format(epsilon=f"{epsilon:g}")
        async with self._lock:
            policy = self.policy()
            updates = {"vw_args": arguments} if arguments != policy.vw_args else {}
            await self._change(policy, updates, {"policyName": None})
        return await self.policy_contract()

    async def _change(
        self, policy: PolicyConfig, updates: dict[str, Any], facade: dict[str, Any]
    ) -> None:
        """Validate the whole new policy, write its file, apply it, then record the facade
        settings. Nothing is written when any value is invalid."""
        new_policy = None
        text = None
        folder = self.service.settings.policies_dir
        path = folder / f"{self.name}.toml"
        if updates:
            try:
                original = await asyncio.to_thread(path.read_text, encoding="utf-8")
            except OSError as exc:
                raise cfg.ConfigurationError(
                    "body", f"the policy file {path} cannot be read ({exc.strerror})"
                ) from None
            text = cfg.patch_policy_text(original, updates)
            try:
                new_policy = parse_policy(self.name, tomllib.loads(text), where=str(path))
            except PolicyError as exc:
                raise cfg.ConfigurationError("body", str(exc)) from None
        if new_policy is not None and text is not None and new_policy.version != policy.version:
            try:
                await asyncio.to_thread(cfg.write_policy_file, folder, self.name, text)
            except OSError as exc:
                raise cfg.ConfigurationError(
                    "body",
                    f"the policy file {path} cannot be written ({exc.strerror}); the "
                    "policies folder must be writable by the service to change settings "
                    "through this API (or edit the policy file and restart)",
                ) from None
            try:
                await self.service.apply_policy(new_policy)
            except Exception:
                # Never leave a file behind that the service could not apply (a restart
                # would fail on it): put the previous content back.
                await asyncio.to_thread(cfg.write_policy_file, folder, self.name, original)
                raise
        state = await self._state()
        for key, value in facade.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        if updates or facade:
            state["lastConfigurationEditDate"] = (
                dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            )
        await self._save_state(state)
