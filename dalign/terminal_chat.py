"""`dalign chat MODEL`: talk to a saved model in the terminal, its replies streamed as they come.

The model and tokenizer load through dalign.models, as in every stage, and each turn is rendered
by dalign.chat with the tokenizer's own chat template (dalign's Zephyr template if it has none),
so what the chat shows is what the stages generate for the same conversation and settings.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading

from dalign.chat import prompt_ids
from dalign.console import quiet_libraries
from dalign.models import ModelError, load_model, load_tokenizer

COMMANDS = """  /reset        start the conversation again (the system prompt is kept)
  /system TEXT  set the system prompt and start again (/system alone removes it)
  /help         show this list
  /quit, /exit  leave (so do Ctrl-D and Ctrl-C at the prompt); Ctrl-C during a reply stops it"""


def _within(kind: type, low: float, high: float, expected: str):
    """An argparse type that refuses a value outside [low, high] before any model is loaded."""
    def parse(text: str):
        if not low <= kind(text) <= high:
            raise argparse.ArgumentTypeError(f"{text} is not {expected}")
        return kind(text)
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Chat with a model in the terminal, in its own chat template; each reply is streamed."
    p.epilog, p.formatter_class = "commands, once in the chat:\n" + COMMANDS, argparse.RawDescriptionHelpFormatter
    p.add_argument("model", help="model folder (e.g. runs/offline/dpo-1ep/model), hub id or built-in name "
                                 "(smollm2-135m-instruct)")
    p.add_argument("--temperature", type=_within(float, 0.0, float("inf"), "a number >= 0"), default=0.7, metavar="T",
                   help="sampling temperature; 0 always takes the likeliest token (greedy) (default: 0.7)")
    p.add_argument("--top-p", type=_within(float, 1e-9, 1.0, "in (0, 1]"), default=0.9, metavar="P",
                   help="sample from the fewest likeliest tokens whose probabilities add up to P; 1 keeps all "
                        "(default: 0.9; unused when greedy)")
    p.add_argument("--max-new-tokens", type=_within(int, 1, sys.maxsize, "at least 1"), default=256, metavar="N",
                   help="longest reply, in tokens (default: 256)")
    p.add_argument("--seed", type=int, help="seed the sampler once, at start, for a repeatable session "
                                            "(default: unseeded)")
    p.add_argument("--system", metavar="TEXT", help="system prompt that opens each conversation (default: none)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights' dtype (default: float32, as dalign loads models elsewhere)")


def chat(args: argparse.Namespace) -> int:
    import torch

    quiet_libraries()  # load and generate warnings and the "Loading weights" bars are not for a chat
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        try:
            tokenizer, fallback = load_tokenizer(args.model), False
        except ModelError:
            # Only the template differs between the two calls, so the second succeeds only when the
            # first failed for want of a template; any other failure raises again, with its message.
            tokenizer, fallback = load_tokenizer(args.model, chat_template="zephyr"), True
        model = load_model(args.model, dtype=args.dtype).to(device).eval()
    except (OSError, ValueError, RuntimeError, AssertionError) as err:
        # A ModelError (a ValueError) explains itself; transformers raises OSError or ValueError for a
        # folder it cannot read, torch RuntimeError or AssertionError for an unknown or absent device.
        why = err if isinstance(err, ModelError) else f"cannot load {args.model} on {device}: {err}"
        print(f"dalign: error: {why}", file=sys.stderr)
        return 2
    if fallback:
        print(f"note: {args.model}'s tokenizer has no chat template; using dalign's default (Zephyr) template",
              file=sys.stderr)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
        import readline  # noqa: F401
    greedy = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top-p {args.top_p}"
    print(f"{args.model} on {device} ({args.dtype}), {greedy}, at most {args.max_new_tokens} new tokens.\n"
          f"/help lists the commands; /quit or Ctrl-D leaves.\n")
    system, turns = args.system, []  # kept apart, so that /reset clears the turns and keeps the system prompt
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()  # so the shell's prompt starts on a line of its own
            return 0
        command, _, rest = line.partition(" ")
        if not line:
            continue
        elif command in ("/quit", "/exit"):
            return 0
        elif command == "/help":
            print("commands:\n" + COMMANDS)
        elif command == "/reset":
            turns = []
            print("(conversation cleared" + ("; the system prompt is kept)" if system else ")"))
        elif command == "/system":
            system, turns = rest.strip() or None, []
            print("(system prompt " + ("set" if system else "removed") + "; conversation cleared)")
        elif command.startswith("/"):
            print(f"(unknown command {command}; /help lists them)")
        else:
            opening = [{"role": "system", "content": system}] if system else []
            reply = _reply(model, tokenizer, opening + turns + [{"role": "user", "content": line}], args)
            if reply is not None:  # a failed turn leaves the conversation as it was
                turns += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


def _reply(model, tokenizer, messages: list[dict], args: argparse.Namespace) -> str | None:
    """Generate in a thread and print its text as the streamer hands it over; the reply as kept
    in the conversation, or None if generation failed."""
    import torch
    from jinja2 import TemplateError
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()

    class Interrupted(StoppingCriteria):  # how Ctrl-C in this thread ends generation in the other
        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    # A chat model ends its turn with the tokenizer's eos or with one of its generation config's
    # (Llama 3's <|eot_id|>, say): stop at any of them.
    config_ends = model.generation_config.eos_token_id
    ends = sorted(({tokenizer.eos_token_id} | set(config_ends if isinstance(config_ends, list) else [config_ends]))
                  - {None})
    sample = args.temperature > 0
    try:
        ids = torch.tensor([prompt_ids(tokenizer, messages)], device=model.device)
    except TemplateError as err:  # a template that refuses the conversation (Gemma's, a system role)
        print(f"(the chat template failed: {err})")
        return None
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def work() -> None:
        try:
            with torch.no_grad():
                result["ids"] = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                    do_sample=sample, temperature=args.temperature if sample else None,
                    top_p=args.top_p if sample else None, top_k=None,  # None: no top-k from the model's defaults
                    eos_token_id=ends, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Interrupted()]))
        except Exception as err:  # reported by the main thread; end() unblocks its wait on the stream
            result["error"] = err
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for piece in streamer:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        print(" (stopped)", end="")
    thread.join()
    print()
    if "error" in result:
        print(f"(generation failed, so the turn is dropped: {type(result['error']).__name__}: {result['error']})\n")
        return None
    new = result["ids"][0, ids.shape[1]:].tolist()
    if len(new) == args.max_new_tokens and new[-1] not in ends:
        print(f"(cut at --max-new-tokens {args.max_new_tokens})")
    print()
    return tokenizer.decode(new, skip_special_tokens=True).strip()
