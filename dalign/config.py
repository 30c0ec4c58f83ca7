"""Typed configs: one per stage and one per role's source; dalign.recipe gathers them in a recipe.

Every field is documented by the docstring on the line below it. An unknown key, a wrong
type or an impossible value fails before any work starts, naming the key and the recipe.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from dalign.binarize import Rejection
from dalign.losses import PreferenceLoss
from dalign.parallel import BatchSizes
from dalign.readers import SourceConfig


class ConfigError(ValueError):
    """A recipe that cannot be used; the message names the recipe file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class TeacherConfig(Strict):
    ramble: float = Field(0.6, ge=0, le=1)
    """Share of answers the world teacher pads with filler, always opening with the same stock
    sentence: a chat model's verbal habit, which the dSFT student learns as a habit (greedy
    decoding keeps it) and which AI feedback and dDPO are there to remove."""
    ignore_format: float = Field(0.15, ge=0, le=1)
    """Share of answers in which it ignores the requested format (sentence count, bare answer)."""
    skip_courtesy: float = Field(0.2, ge=0, le=1)
    """Share of notes it ends without the sign-off."""
    error: float = Field(0.03, ge=0, le=1)
    """Share of answers it gets wrong."""
    seed: int = 0
    """Seed of the teacher's choices (each reply is also seeded by its conversation)."""


class OpenAIConfig(Strict):
    """A model behind an OpenAI-compatible chat-completions server (dalign.openai_backend)."""

    model_config = ConfigDict(strict=True)

    base_url: str
    """Server root including the API version, e.g. 'https://api.openai.com/v1' or 'http://localhost:8000/v1'."""
    model: str
    """Model name sent with every request."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key; None for servers that need none."""
    max_concurrency: int = Field(8, ge=1)
    """Requests in flight at once (threads)."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds a request may take before it is abandoned and retried."""
    max_retries: int = Field(6, ge=0)
    """Retries per request after the first attempt; a request failing all of them is reported failed."""
    backoff_base_s: float = Field(1.0, gt=0)
    """Backoff before retry k is drawn uniformly from [0, min(backoff_max_s, backoff_base_s * 2**k)]."""
    backoff_max_s: float = Field(60.0, gt=0)
    """Longest wait between attempts, Retry-After included."""
    requests_per_minute: int | None = Field(None, ge=1)
    """Most requests started in any 60 s window; None for no limit."""
    tokens_per_minute: int | None = Field(None, ge=1)
    """Most tokens (prompt + completion) in any 60 s window, estimated until usage comes back; None for no limit."""
    cache_dir: str | None = None
    """Folder of cached replies; None disables the cache."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling mass; None leaves the server default."""
    stop: list[str] | None = None
    """Strings at which the server stops generating; None for none."""

    @model_validator(mode="after")
    def _backoff_order(self):
        if self.backoff_base_s > self.backoff_max_s:
            raise ValueError(f"backoff_base_s {self.backoff_base_s} is above backoff_max_s {self.backoff_max_s}")
        return self


class ModelShape(Strict):
    vocab_size: int = Field(1536, ge=300)
    """Upper bound on the BPE vocabulary trained on world text."""
    hidden_size: int = Field(192, ge=16)
    """Width of the Llama model."""
    layers: int = Field(4, ge=1)
    """Number of transformer blocks."""
    heads: int = Field(4, ge=1)
    """Attention heads (hidden_size must divide by it)."""
    intermediate_size: int = Field(512, ge=16)
    """Width of the MLP."""
    max_position: int = Field(512, ge=32)
    """Longest sequence the model can see."""

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


class TrainConfig(Strict):
    """What the shared training loop needs; SFT and pretraining extend it."""

    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (the paper used none)."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of steps spent warming up linearly before the cosine decay."""
    per_device_batch_size: int = Field(16, ge=1)
    """Sequences per micro-batch on each process."""
    global_batch_size: int | None = Field(None, ge=1)
    """Rows per optimizer step over all processes, the same however many are launched: the
    accumulation is derived as global / (per-device x processes), and a launch where that is not
    a whole number is refused; None: per-device x gradient_accumulation x processes."""
    gradient_accumulation: int | None = Field(None, ge=1)
    """Micro-batches per optimizer step when global_batch_size is not set (None: 1); set one of the two."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this norm."""
    max_length: int = Field(256, ge=16)
    """Longest training sequence in tokens."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training rows (fractions allowed)."""
    max_steps: int | None = Field(None, ge=1)
    """If set, stop after this many optimizer steps instead."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Precision of the matrix products: 'no' (fp32), 'bf16' or 'fp16' (GPUs only). Weights and
    optimizer states stay fp32 (autocast) under DDP and FSDP2; under DeepSpeed it is the engine's
    bf16/fp16 mode (16-bit weights, fp32 master copy in the optimizer). GPU recipes use bf16."""
    activation_checkpointing: bool = False
    """Keep only each block's input in the forward and recompute the rest in the backward: the
    gradients are the same, the activation memory far smaller, the step about a third slower."""
    checkpoint_every: int = Field(100, ge=1)
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = Field(1, ge=1)
    """Most recent checkpoints kept; older ones are deleted once a newer one is complete."""
    skip_non_finite: bool = False
    """A step whose loss or gradient is NaN or infinite: False stops the stage with an error naming
    the step and its rows (the last good checkpoint stays); True skips it (no update, no schedule
    step), logs it in metrics.jsonl and counts it in the manifest (skipped_steps). Not under DeepSpeed."""
    log_every: int = Field(10, ge=1)
    """Write a metrics line every this many steps, and at every checkpoint (so that no line averages
    steps from before and after a resume)."""
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, exclude=True)
    """Trackers that also get the numbers of every metrics.jsonl line (dalign.tracking): tensorboard
    (event files in <stage>/tensorboard/), wandb (a run in <stage>/wandb/, offline unless WANDB_MODE
    says otherwise); each needs its package (pip install dalign[tracking]). Empty: metrics.jsonl only.
    Left out of the dumped config, so of the stage's config hash: it changes nothing a stage makes,
    and turning it on resumes or skips a stage rather than refusing its folder."""
    seed: int = 0
    """Seed of the initial weights and of the data order."""

    @model_validator(mode="after")
    def _one_batch_rule(self):
        if self.global_batch_size is not None and self.gradient_accumulation is not None:
            raise ValueError("set global_batch_size or gradient_accumulation, not both (the accumulation is derived "
                             "from the global batch)")
        return self

    def batch_sizes(self, processes: int, where: str = "train") -> BatchSizes:
        """The split of a step over `processes`; refuses a global batch they cannot share evenly
        (`where` names the recipe section in the message)."""
        if self.global_batch_size is None:
            return BatchSizes(self.per_device_batch_size, self.gradient_accumulation or 1, processes)
        per_step = self.per_device_batch_size * processes
        if self.global_batch_size % per_step:
            raise ConfigError(f"{where}.global_batch_size {self.global_batch_size} is not a whole number of per-device "
                              f"batches: per_device_batch_size {self.per_device_batch_size} x {processes} processes "
                              f"= {per_step} rows per micro-step, and {self.global_batch_size} / {per_step} = "
                              f"{self.global_batch_size / per_step:g}; change per_device_batch_size or the "
                              "number of processes")
        return BatchSizes(self.per_device_batch_size, self.global_batch_size // per_step, processes)


class BaseConfig(TrainConfig):
    """Pretraining defaults: one pass over 40k world documents (about 2.2M tokens) in small
    batches, which teaches a 2M-parameter model more per minute than fewer, larger steps."""

    model: ModelShape = ModelShape()
    """Shape of the base model trained from scratch."""
    corpus_documents: int = Field(40000, ge=100)
    """World documents generated as plain pretraining text."""
    learning_rate: float = Field(3e-3, gt=0)
    """Peak learning rate of AdamW."""
    per_device_batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch on each process."""
    chat_template: str | None = None
    """Jinja chat template saved with the tokenizer; None means Zephyr's (dalign.chat.ZEPHYR_TEMPLATE)."""


class DialoguesConfig(Strict):
    n_dialogues: int = Field(4000, ge=1)
    """Dialogues to generate (before filtering)."""
    min_turns: int = Field(1, ge=1)
    """Fewest user turns in a dialogue."""
    max_turns: int = Field(3, ge=1)
    """Most user turns in a dialogue."""
    max_tokens: int = Field(256, ge=16)
    """Dialogues longer than this, in tokens with the chat template, are dropped and counted."""
    chunk_size: int = Field(256, ge=1)
    """Dialogues written per part file; a killed run resumes at the first missing part."""
    seed: int = 0
    """Seed of the seed topics and of each dialogue's sampling."""
    topics: list[str] = Field(default_factory=list)
    """Seed topics the user simulator opens dialogues from (UltraChat's meta-topics), cycled to
    n_dialogues; empty: the world's seed topics, drawn with `seed`."""
    source: SourceConfig | None = None
    """Dialogues read instead of generated (ultrachat_200k-style rows); None: the teacher and the
    user simulator write n_dialogues of them."""

    @model_validator(mode="after")
    def _turns_order(self):
        if self.min_turns > self.max_turns:
            raise ValueError(f"min_turns {self.min_turns} is above max_turns {self.max_turns}")
        return self


class LoraConfig(Strict):
    """Low-rank adapters (PEFT) instead of training every weight."""

    rank: int = Field(16, ge=1)
    """Rank r of each adapter (the paper's QLoRA recipes: 16 for SFT, 128 for DPO)."""
    alpha: float = Field(32.0, gt=0)
    """Scale: the adapter's update is multiplied by alpha / rank."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """Layers that get adapters: 'all-linear' (every linear layer but the output head) or names."""
    load_in_4bit: bool = False
    """QLoRA: keep the frozen weights in 4-bit NF4 (bitsandbytes, CUDA GPUs only); checked before any work."""


class SFTConfig(TrainConfig):
    learning_rate: float = Field(2e-3, gt=0)
    """Peak learning rate of AdamW (high: the student is tiny and sees each dialogue twice)."""
    per_device_batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch on each process (packed rows of up to max_length tokens)."""
    epochs: float = Field(2.0, gt=0)
    """Passes over the dialogues (the paper used 1-3)."""
    packing: bool = True
    """Pack several dialogues into one sequence; attention never crosses a dialogue border."""
    replay_ratio: float = Field(0.25, ge=0, lt=1)
    """Share of training sequences that are pretraining text, so base knowledge survives."""
    skip_bad_rows: bool = False
    """Drop and count malformed dialogue rows instead of stopping at the first one."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight; the saved model has them merged in."""


class ServeConfig(Strict):
    """A model dalign serves itself for the length of one stage (dalign.serving): it starts the
    server, waits for its health check, sends the stage's requests to it through the OpenAI
    backend, and stops it when the stage ends or fails, SIGTERM included."""

    model: str
    """The model to serve: this run's 'start', 'sft' or 'base', a model folder, hub id or built-in name."""
    command: str = "vllm serve {model} --host 127.0.0.1 --port {port}"
    """The server's command line: {model} becomes the model's folder or hub id (also the model name
    requests carry), {port} a free port of 127.0.0.1. Any OpenAI-compatible server works, e.g.
    'transformers serve {model} --host 127.0.0.1 --port {port}'."""
    data_parallel: int = Field(1, ge=1)
    """Servers started on the model, one per GPU (server j on GPU j, or local rank r x n + j under a
    launch); a batch's rows are spread over them, row i to server i % n."""
    health_path: str = "/health"
    """Path answered with 200 once the server is ready (vLLM's and transformers serve's)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables added to the server's (CUDA_VISIBLE_DEVICES, HF_HOME, ...)."""
    startup_timeout_s: float = Field(900.0, gt=0)
    """Seconds the server may take to come up (a 7B model loads and compiles in minutes)."""
    max_concurrency: int = Field(32, ge=1)
    """Requests in flight at once; vLLM batches the concurrent ones on the GPU."""
    timeout_s: float = Field(300.0, gt=0)
    """Seconds a request may take before it is abandoned and retried."""
    max_retries: int = Field(2, ge=0)
    """Retries per request after the first attempt."""


SOURCES = ("world", "openai", "serve", "model")


def _one_of(spec, what: str) -> None:
    given = [k for k in SOURCES if getattr(spec, k) is not None]
    if len(given) != 1:
        raise ValueError(f"{what}needs exactly one source of world, openai, serve or model (got {', '.join(given) or 'none'})")


class WorldRole(Strict):
    """The offline world plays the role (dalign/world/); it has no settings of its own here."""


class RoleSpec(Strict):
    """Who plays a role: exactly one source, the offline world, a server or a local model."""

    world: WorldRole | None = None
    """The offline world's player of this role (the default)."""
    openai: OpenAIConfig | None = None
    """A model behind an OpenAI-compatible chat-completions server (vLLM, TGI, an API)."""
    serve: ServeConfig | None = None
    """A model dalign serves itself for the stage (vLLM by default)."""
    model: str | None = None
    """A local model: this run's 'start', 'sft' or 'base' (the world's pretrained model), a model
    folder, a hub id or a built-in name (smollm2-135m-instruct)."""

    @model_validator(mode="after")
    def _one_source(self):
        _one_of(self, "")
        return self


class TeacherRole(RoleSpec):
    """The teacher: writes the dSFT answers (GPT-3.5 for UltraChat in the paper)."""

    world: TeacherConfig | None = None
    """The world teacher, with its flaw rates."""


class RolesConfig(Strict):
    """Every model role of the recipe besides the student and the ensemble."""

    teacher: TeacherRole = TeacherRole(world=TeacherConfig())
    """Answers every turn of the dSFT dialogues."""
    user_simulator: RoleSpec = RoleSpec(world=WorldRole())
    """Opens a dialogue from its seed topic and asks the follow-ups; a server or local model plays it
    through the prompt templates user_opening.txt and user_followup.txt."""
    rater: RoleSpec = RoleSpec(world=WorldRole())
    """Rates each prompt's completions on the UltraFeedback aspects (GPT-4 in the paper)."""
    judge: RoleSpec = RoleSpec(world=WorldRole())
    """Grades MT-Bench-style answers 1-10 (GPT-4); a server or local model through judge_single.txt.
    The world's judge also says whether an answer is right, which adds greedy accuracy and pass@k."""
    comparer: RoleSpec = RoleSpec(world=WorldRole())
    """Picks the better of two answers for the AlpacaEval-style win rate (GPT-4), through compare.txt."""


class MemberConfig(Strict):
    """One model of the AI-feedback ensemble, from exactly one source."""

    name: str
    """Name recorded with each completion it writes."""
    model: str | None = None
    """A local model: this run's 'start', 'sft' or 'base', a model folder, hub id or built-in name."""
    temperature: float = Field(0.7, ge=0)
    """Sampling temperature of this member."""
    world: TeacherConfig | None = None
    """A world generator with these flaw rates: the world's stand-in for a weaker model of the pool."""
    openai: OpenAIConfig | None = None
    """A model behind an OpenAI-compatible server (vLLM, TGI, an API): where and which."""
    serve: ServeConfig | None = None
    """A model dalign serves itself for the completions stage (vLLM by default), e.g. this run's sft."""

    @model_validator(mode="after")
    def _one_source(self):
        _one_of(self, f"member {self.name!r} ")
        return self


def _default_members() -> list[MemberConfig]:
    return [MemberConfig(name="sft-t0.7", model="sft", temperature=0.7),
            MemberConfig(name="sft-t1.0", model="sft", temperature=1.0),
            MemberConfig(name="base", model="start", temperature=0.7),
            MemberConfig(name="world-erratic", world=TeacherConfig(error=0.6, ramble=0.1, ignore_format=0.1, skip_courtesy=0.1)),
            MemberConfig(name="world-rambler", world=TeacherConfig(error=0.1, ramble=0.9, ignore_format=0.1, skip_courtesy=0.1)),
            MemberConfig(name="world-formatless", world=TeacherConfig(error=0.1, ramble=0.1, ignore_format=0.9, skip_courtesy=0.6))]


class CompletionsConfig(Strict):
    n_prompts: int = Field(1500, ge=1)
    """AI-feedback prompts, drawn apart from the dSFT prompts."""
    per_prompt: int = Field(4, ge=2)
    """Ensemble members sampled to answer each prompt (UltraFeedback: 4 of 17)."""
    members: list[MemberConfig] = Field(default_factory=_default_members)
    """The ensemble."""
    principles: list[str] = Field(default_factory=lambda: ["helpfulness", "honesty", "truthfulness", "none"])
    """Principle system prompts sampled per completion (files in dalign/prompts/principles/)."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest completion generated by a model member."""
    chunk_size: int = Field(250, ge=1)
    """Prompts per part file."""
    prompts: SourceConfig | None = None
    """AI-feedback prompts read from a file or dataset (rows with `prompt`, text or messages, or
    `instruction`); None: n_prompts world instructions, drawn apart from the dSFT prompts."""
    seed: int = 7
    """Seed of the prompts, of the members and principles drawn for each."""


class RatingConfig(Strict):
    retries: int = Field(2, ge=0)
    """Times a rating reply that does not parse is asked for again before it counts as failed."""
    chunk_size: int = Field(250, ge=1)
    """Prompts per part file."""
    seed: int = 0
    """Seed of the order completions are shown in."""


class PairsConfig(Strict):
    rejection: Rejection = Rejection.RANDOM
    """How the rejected completion is picked: random (the paper), random_lower, worst, or all (every
    strictly lower-rated completion makes its own pair with the chosen; the manifest counts the
    pairs and the prompts they came from)."""
    test_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of prompts held out as the test split."""
    dev_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of prompts held out as the dev split (dev.jsonl), apart from the test split and
    training; a prompt's split is one seeded draw, so the test split is the same whatever this is."""
    seed: int = 0
    """Seed of the picks and of the split."""
    source: SourceConfig | None = None
    """Preference pairs read instead of made by AI feedback (ultrafeedback_binarized-style: prompt,
    chosen, rejected); None: the completions are rated and binarized."""
    source_rows: Literal["pairs", "unpaired"] = "pairs"
    """What `source` holds: pairs, or unpaired rows (prompt, completion, label: TRL's KTO format, as
    trl-lib/kto-mix-14k), which only loss kto trains on (the other variants are refused at load
    time); `held_out` stays pairs, since the reward accuracy compares two answers. Left out of the
    hash when 'pairs'."""
    held_out: SourceConfig | None = None
    """Preference pairs kept apart for the held-out reward accuracy; None: the AI-feedback test
    split (required with `source`)."""

    @model_serializer(mode="wrap")
    def _rows_when_unpaired(self, handler):
        dumped = handler(self)
        if dumped.get("source_rows") == "pairs":
            dumped.pop("source_rows", None)
        return dumped


class DPOConfig(TrainConfig):
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference model (the paper: 0.1)."""
    loss: PreferenceLoss = PreferenceLoss.SIGMOID
    """sigmoid (DPO), ipo, hinge, sigmoid_norm (length-normalized DPO), simpo or orpo (these two
    reference-free: no reference pass; beta is SimPO's beta, ORPO's lambda), or kto (unpaired rows,
    see kto_desirable_weight); dalign.losses."""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin gamma (read by loss simpo only, and only then in the config
    hash: the other losses' stages keep theirs)."""
    kto_desirable_weight: float = Field(1.0, gt=0)
    """KTO's weight on the desirable rows' losses (read by loss kto only, and only then in the hash)."""
    kto_undesirable_weight: float = Field(1.0, gt=0)
    """KTO's weight on the undesirable rows' losses; the KTO paper asks for weights such that
    desirable_weight * desirable rows / (undesirable_weight * undesirable rows) is in [1, 4/3]."""
    chosen_nll: float = Field(0.0, ge=0)
    """Weight of an added NLL term on the chosen answer (RPO); 0 is plain DPO, the paper's. The
    term keeps the chosen log-probs from falling, but it is also supervised training on the
    chosen answers, so with it DPO on the base model learns to chat (measured: 6.34 against 3.88
    without, where dSFT scores 5.56), which is not the ablation the paper ran."""
    learning_rate: float = Field(5e-5, gt=0)
    """Peak learning rate of AdamW (the paper: 5e-7 on 7B; a 2M-parameter model needs far more).
    Chosen on the world's dev split (README, "Choices made on dev"): one epoch at 5e-5 scored 7.24,
    at 1e-4 6.95, at 2e-4 6.73."""
    per_device_batch_size: int = Field(8, ge=1)
    """Pairs per micro-batch on each process (each pair is two sequences)."""
    packed: bool = True
    """Pack each micro-batch's pairs into one row: the prompt once for chosen and rejected (prefix
    sharing), no padding, and logits only where an answer token is predicted. Same loss and
    gradients as the padded batch (tests/test_packed.py), about twice as fast on a CPU (bench/);
    false for the plain padded batch."""
    lora: LoraConfig | None = None
    """Train LoRA adapters; the reference is then the same model with its adapters switched off
    (no second copy in memory), and the saved model has the adapters merged in."""

    @model_validator(mode="after")
    def _orpo_has_its_own_nll(self):
        if self.loss is PreferenceLoss.ORPO and self.chosen_nll:
            raise ValueError("chosen_nll: orpo's loss already holds the chosen answer's NLL; set chosen_nll: 0")
        return self

    @model_serializer(mode="wrap")
    def _gamma_only_for_simpo(self, handler):
        dumped = handler(self)
        if self.loss is not PreferenceLoss.SIMPO:
            dumped.pop("simpo_gamma", None)
        if self.loss is not PreferenceLoss.KTO:
            dumped.pop("kto_desirable_weight", None)
            dumped.pop("kto_undesirable_weight", None)
        return dumped


class DPOVariant(Strict):
    """One dDPO run of the recipe; several make the paper's ablation (Table 3) from shared stages."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Short name; the run's folder is dpo-<name>."""
    start: str = Field("sft", pattern="^(sft|start|base)$")
    """Model DPO starts from and uses as frozen reference: 'sft' (the recipe) or 'start' (the
    recipe's starting model: the no-SFT ablation); 'base' is the world's pretrained model, the
    start when `start` is world."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the preference pairs; None: dpo.epochs."""
    learning_rate: float | None = Field(None, gt=0)
    """Peak learning rate of this variant; None: dpo.learning_rate (sft.learning_rate for method sft)."""
    beta: float | None = Field(None, gt=0)
    """DPO's beta for this variant; None: dpo.beta."""
    method: Literal["dpo", "sft"] = "dpo"
    """dpo: DPO on the pairs; sft: SFT (the sft section's settings) on the pairs' chosen answers
    only, the paper's dSFT-2 row, with the variant's start as the reference of its reward accuracy."""
    loss: PreferenceLoss | None = None
    """This variant's preference loss (dpo.loss's values: sigmoid, ipo, hinge, sigmoid_norm, simpo,
    orpo, kto); None: dpo.loss. Left out of the config (and its hash) when None."""
    rows: Literal["pairs", "ratings"] = "pairs"
    """What a KTO variant learns from: 'pairs' (each training pair split into its chosen answer,
    desirable, and its rejected one, undesirable) or 'ratings' (every rated completion of the
    training prompts, desirable when its score is at least `desirable_score`, written to the stage's
    unpaired.jsonl). The pairwise losses read pairs only. Left out of the hash when 'pairs'."""
    desirable_score: float | None = None
    """The score from which a rated completion is desirable (rows: ratings; required there, and
    refused otherwise). Left out of the hash when None."""
    sft_data: bool = False
    """ORPO only: train on the dSFT data too (the dialogues, and on the world the sft section's
    replay of pretraining text), each sequence adding its mean NLL beside the pairs' ORPO loss: one
    stage in place of dSFT and dDPO, as ORPO is meant to run. Left out of the hash when false."""
    reference: str | None = Field(None, pattern="^(sft|start|base)$")
    """The frozen reference when it is not the variant's start (as TRL's ref_model apart from its
    model): 'sft', 'start' or 'base', as `start`; None: the start. Refused for the reference-free
    losses (simpo, orpo). Left out of the hash when None."""

    @model_serializer(mode="wrap")
    def _loss_when_set(self, handler):
        dumped = handler(self)
        for key, default in (("loss", None), ("rows", "pairs"), ("desirable_score", None), ("sft_data", False),
                             ("reference", None)):
            if dumped.get(key) == default:
                dumped.pop(key, None)
        return dumped


def _default_variants() -> list[DPOVariant]:
    return [DPOVariant(name="1ep", epochs=1), DPOVariant(name="3ep", epochs=3), DPOVariant(name="base", start="start", epochs=1),
            DPOVariant(name="sft2", method="sft", epochs=1)]


class EvalConfig(Strict):
    questions_per_category: int = Field(20, ge=1)
    """Held-out two-turn questions per category (MT-Bench has 10; more narrow the intervals)."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest answer generated."""
    batch_size: int = Field(64, ge=1)
    """Prompts generated together."""
    pass_k: int = Field(4, ge=1)
    """Samples per first turn for pass@k."""
    pass_temperature: float = Field(0.8, gt=0)
    """Temperature of the pass@k samples."""
    win_rate_instructions: int = Field(160, ge=8)
    """World instructions for the AlpacaEval-style win rate against the dSFT model's answers
    (when `alpaca_eval` is not set)."""
    seed: int = 1234
    """Seed of the held-out questions and of sampling; kept apart from the training seeds."""
    split: Literal["dev", "test"] = "test"
    """Held-out split scored: test (the reported figures) or dev (for choosing settings). The world's
    test questions and win-rate instructions are drawn first, then the dev ones, each draw apart from
    every training prompt and every earlier draw; the reward accuracy reads the pairs' split of the
    same name. A question or instruction file is its own split."""
    mt_bench: SourceConfig | None = None
    """MT-Bench question file (question_id, category, turns, reference) graded by roles.judge; None:
    questions_per_category held-out world questions per category."""
    alpaca_eval: SourceConfig | None = None
    """AlpacaEval instructions with a reference model's outputs (instruction, output, generator):
    each model's answers are compared with them by roles.comparer, in both orders; None: world
    instructions, against the dSFT model's answers (the starting model's when sft is skipped)."""
    skip: list[Literal["mt_bench", "win_rate", "reward_accuracy"]] = Field(default_factory=list)
    """Parts of the evaluation not run, e.g. [mt_bench, win_rate] when no judge is worth asking."""
    mc: dict[str, Any] | None = None
    """Multiple-choice benchmarks (lm-evaluation-harness) of every evaluated model: dalign.mc.MCConfig's
    fields but the model; None skips them."""

    @model_validator(mode="after")
    def _mc_fields(self):
        if self.mc is not None:
            from dalign.mc import MCConfig  # lm_eval itself is imported only when the benchmark runs

            MCConfig(model="start", **self.mc)
        return self
