"""Policies change at runtime: an edited policy file is applied by every running service
(engine, served model, trainer) as a new version, never as a silent model reset."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, Slot
from bandit_service.policy import load_policies, parse_policy
from bandit_service.service import DecisionService
from bandit_service.store.database import make_engine
from bandit_service.training import Trainer

CANDIDATES = (Candidate("a", {"k": "1"}), Candidate("b", {"k": "2"}))


def touch_write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so a same-second rewrite is still seen."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_edited_policy_files_are_applied_at_runtime(settings: Settings) -> None:
    settings = settings.model_copy(update={"trainer": "off"})
    path = settings.policies_dir / "default.toml"

    async def scenario() -> None:
        service = DecisionService(settings, load_policies(settings.policies_dir))
        await service.start()
        try:
            first = service.policies["default"]
            assert await service.reload_policies() == []  # nothing changed since start

            # Exploration-only change: a new version, the same model lineage (and model).
            model = service.models.get("default")
            touch_write(path, path.read_text().replace("--epsilon 0.2", "--epsilon 0.3"))
            assert await service.reload_policies() == ["default"]
            second = service.policies["default"]
            assert second.version != first.version and second.model_key == first.model_key
            assert service.engine.policy("default") is second
            assert "--epsilon 0.3" in service.models.get("default").vw_args
            assert service.models.get("default") is not model  # new arguments, same weights
            row = await service.decide(
                DecisionRequest("after-edit", "default", CANDIDATES, (Slot("0"),))
            )
            assert row["policy_version"] == second.version

            # An invalid edit is refused; the running version stays.
            touch_write(path, 'vw_args = "--cb_explore_adf" \nreward_windw_seconds = 5\n')
            assert await service.reload_policies() == []
            assert service.policies["default"] is second

            # A new file is a new policy, served at once.
            (settings.policies_dir / "extra.toml").write_text("holdout_share = 0\n")
            assert await service.reload_policies() == ["extra"]
            row = await service.decide(
                DecisionRequest("extra-1", "extra", CANDIDATES, (Slot("0"),))
            )
            assert row["policy"] == "extra"
        finally:
            await service.close()

    asyncio.run(scenario())


def test_trainer_follows_policy_changes(settings: Settings) -> None:
    policies = load_policies(settings.policies_dir)
    db = make_engine(settings.database_url)
    trainer = Trainer(db, policies)
    old = trainer.trainers["default"]
    online = policies["default"]
    logging_only = parse_policy(
        "default", {"vw_args": online.vw_args, "learning_mode": "logging_only"}
    )
    trainer.set_policy(logging_only)
    trainer.run_once()
    assert "default" not in trainer.trainers  # logging only: nothing to learn
    trainer.set_policy(online)
    trainer.run_once()
    assert trainer.trainers["default"] is not old
    assert trainer.trainers["default"].policy == online

    db.dispose()


def test_model_update_seconds_spaces_out_model_swaps(settings: Settings) -> None:
    """Personalizer's modelExportFrequency: after a swap, newer checkpoints wait until the
    interval has passed; the first model after start is loaded at once."""
    from sqlalchemy.orm import Session

    from bandit_service.learners.vw import VWLearner
    from bandit_service.model_registry import ModelRegistry
    from bandit_service.store import repository

    db = make_engine(settings.database_url)
    try:
        for interval, second_swap in ((3600.0, False), (0.0, True)):
            policy = parse_policy(
                f"p{int(interval)}",
                {"vw_args": "--cb_explore_adf --epsilon 0.2", "model_update_seconds": interval},
            )
            registry = ModelRegistry(db, {policy.name: policy})

            def checkpoint(policy=policy) -> None:  # type: ignore[no-untyped-def]
                with Session(db) as session, session.begin():
                    repository.insert_checkpoint(
                        session,
                        {"policy": policy.name, "model_key": policy.model_key,
                         "policy_version": policy.version, "position": 0,
                         "learned_events": 0, "skipped_events": 0, "created_at": 0.0,
                         "note": "", "model": VWLearner(policy.vw_args).to_bytes()},
                        keep=5,
                    )  # fmt: skip

            checkpoint()
            assert registry.refresh() == [policy.name]  # the first one: at once
            checkpoint()
            assert (registry.refresh() == [policy.name]) is second_swap
            assert registry.get(policy.name).model_version == (2 if second_swap else 1)
    finally:
        db.dispose()


def test_the_standalone_trainer_follows_policy_file_changes(tmp_path: Path) -> None:
    """`bandit-service train` applies a changed policy file (e.g. a configuration PUT on an
    API process) at its next cycle, as serving processes do; a broken file is not applied."""
    import logging

    from bandit_service.cli import _policy_follower
    from bandit_service.policy import PolicyConfig, load_policies

    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "default.toml").write_text('vw_args = "--cb_explore_adf --epsilon 0.1"\n')
    (folder / "ignored.toml").write_text('vw_args = "--cb_explore_adf"\n')
    policies = {"default": load_policies(folder)["default"]}

    class Recorder:
        def __init__(self) -> None:
            self.applied: list[str] = []

        def set_policy(self, policy: PolicyConfig) -> None:
            self.applied.append(policy.vw_args)

    trainer = Recorder()
    follow = _policy_follower(folder, policies, trainer, logging.getLogger("test"))
    follow()
    assert trainer.applied == []  # nothing changed
    path = folder / "default.toml"
    path.write_text('vw_args = "--cb_explore_adf --epsilon 0.1 -q ua"\n')
    os.utime(path, ns=(1, 1))  # a distinct mark even within the clock's resolution
    (folder / "ignored.toml").write_text('vw_args = "--cb_explore_adf -q ua"\n')
    follow()
    assert trainer.applied == ["--cb_explore_adf --epsilon 0.1 -q ua"]
    assert policies["default"].vw_args == "--cb_explore_adf --epsilon 0.1 -q ua"
    path.write_text('vw_args = "--cb_explore_adf --bogus"\n')
    follow()
    assert trainer.applied == ["--cb_explore_adf --epsilon 0.1 -q ua"]  # refused, logged
