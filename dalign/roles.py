"""Who plays each role of a recipe: the offline world, an OpenAI-compatible server (one given, or
one dalign serves itself for the stage), or a local model.

A stage asks for a role by name and gets a `Backend`; it never knows which source is behind
it. The offline world's players read the world's text directly; a server or a local model
plays the user simulator and the MT-Bench judge through the prompt templates
(dalign.prompted), and plays the teacher, the rater and the comparer by answering the
stage's requests as they are (the rating and comparison prompts are already templates).
"""

from __future__ import annotations

from pathlib import Path

from dalign.backends import Backend
from dalign.config import MemberConfig, RoleSpec, TeacherConfig
from dalign.generation import LocalModel
from dalign.models import resolve
from dalign.parallel import summed_over_processes
from dalign.recipe import RecipeConfig
from dalign.world.roles import Flaws, WorldTeacher


def models(recipe: RecipeConfig, inputs: dict[str, Path]) -> dict[str, Path | str]:
    """This run's local models by name: 'start' (and 'base' on the world), 'sft' once trained,
    each student's 'sft-<name>' and every dDPO variant's 'dpo-<name>' that the stage reads."""
    found: dict[str, Path | str] = {}
    if recipe.world_start:
        if "base" in inputs:
            found["base"] = found["start"] = inputs["base"] / "model"
    else:
        found["start"] = recipe.start.model
    found.update({name: path / "model" for name, path in inputs.items() if name.split("-")[0] in ("sft", "dpo")})
    return found


def chat_template(recipe: RecipeConfig) -> str | None:
    return None if recipe.world_start else recipe.start.chat_template


def local(recipe: RecipeConfig, spec: str | Path, inputs: dict[str, Path], name: str, batch_size: int = 64) -> LocalModel:
    """A local model by this run's name ('start', 'sft', ...) or by folder, hub id or built-in name."""
    path = models(recipe, inputs).get(str(spec), spec)
    return LocalModel.load(resolve(path), batch_size, name, chat_template(recipe))


def world_teacher(flaws: TeacherConfig, name: str = "world-teacher") -> WorldTeacher:
    return WorldTeacher(Flaws(**flaws.model_dump(exclude={"seed"})), seed=flaws.seed, name=name)


def backend(recipe: RecipeConfig, role: str, inputs: dict[str, Path], out: Path) -> Backend:
    """The backend playing `role` (a field of recipe.roles) for the stage writing into `out`."""
    from dalign.prompted import PromptedJudge, PromptedUser
    from dalign.world.judge import WorldComparer, WorldJudge, WorldRater
    from dalign.world.roles import WorldUser

    spec: RoleSpec = getattr(recipe.roles, role)
    if spec.world is not None:
        return {"teacher": lambda: world_teacher(spec.world), "user_simulator": lambda: WorldUser(seed=recipe.dialogues.seed),
                "rater": WorldRater, "judge": WorldJudge, "comparer": WorldComparer}[role]()
    model = _server_or_local(recipe, spec, inputs, out, role)
    wrap = {"user_simulator": PromptedUser, "judge": PromptedJudge}.get(role)
    return wrap(model) if wrap else model


def member(recipe: RecipeConfig, m: MemberConfig, inputs: dict[str, Path], out: Path) -> Backend:
    """An AI-feedback ensemble member's backend."""
    if m.world is not None:
        return world_teacher(m.world, m.name)
    return _server_or_local(recipe, m, inputs, out, m.name)


def _server_or_local(recipe, spec, inputs, out: Path, name: str) -> Backend:
    if spec.openai is not None:
        from dalign.openai_backend import OpenAIBackend

        return OpenAIBackend.for_stage(spec.openai, out, name)
    if spec.serve is not None:
        from dalign import serving

        return serving.start(spec.serve, resolve(models(recipe, inputs).get(spec.serve.model, spec.serve.model)), out, name)
    return local(recipe, spec.model, inputs, name)


def usage(backends) -> dict:
    """Generation throughput of local models and token usage of servers, for the manifest, over
    every process of a launch (tokens per second summed: the launch's rate)."""
    from dalign.prompted import PromptedJudge, PromptedUser

    facts = {"generation": {}, "usage": {}}
    for b in backends:
        if isinstance(b, (PromptedJudge, PromptedUser)):
            b = b.model  # a role played through a template: its model's figures
        if isinstance(b, LocalModel):
            facts["generation"][b.name] = b.throughput()
        elif hasattr(b, "usage"):
            facts["usage"][b.name] = b.usage()
    return summed_over_processes({k: v for k, v in facts.items() if v})  # each rank asked for its own rows


def tokenizer(recipe: RecipeConfig, inputs: dict[str, Path]):
    """The starting model's tokenizer, with the recipe's chat template."""
    from dalign.models import load_tokenizer

    if recipe.world_start:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(inputs["base"] / "model")
    return load_tokenizer(recipe.start.model, recipe.start.chat_template)
