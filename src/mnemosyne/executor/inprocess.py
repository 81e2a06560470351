"""World size 1: the worker lives in the engine's process. Simple to debug, no serialization."""

from __future__ import annotations

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.executor.worker import RuntimeInfo, Worker
from mnemosyne.models.loaders import ModelLoader
from mnemosyne.plan import StepPlan, StepResult


class InProcessExecutor:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, loader: ModelLoader):
        self.worker = Worker(config, model_config, loader)

    @property
    def info(self) -> RuntimeInfo:
        return self.worker.info

    def execute(self, plan: StepPlan) -> StepResult:
        return self.worker.execute(plan)

    def shutdown(self) -> None:
        pass
