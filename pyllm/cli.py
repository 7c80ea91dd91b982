"""The `pyllm` command: a thin argparse layer over the library.

Not where work is done: each subcommand builds its config and calls into pyllm.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

try:
    import tomllib
except ImportError:   # Python 3.10: --config needs 3.11's tomllib
    tomllib = None

from pyllm import __version__, bench, distributed, finetune, kernels, report
from pyllm.data import default_corpus_files, read_default_corpus
from pyllm.engine import EngineConfig
from pyllm.explain import piece
from pyllm.generate import SamplingConfig, generate_stream
from pyllm.hub import DEFAULT_MODEL
from pyllm.llm import CHAT_REPETITION_PENALTY, LLM, top_probabilities
from pyllm.lora import LoRA
from pyllm.models import ARCHITECTURES, ModelConfig
from pyllm.serve import serve
from pyllm.tokenizer import Tokenizer
from pyllm.train import REPORT, TrainConfig, TrainingError, TrainingInterrupted, plot_losses, train


def _cmd_info(args: argparse.Namespace) -> int:
    print(f"pyllm kernels: isa={kernels.get_isa()} (available: {', '.join(kernels.available_isas())}), "
          f"threads={kernels.get_num_threads()}")
    if args.peak:
        print(f"measured fp32 FMA peak: {kernels.measure_fma_peak(1.0):.1f} GFLOP/s")
        print(f"measured memory read bandwidth: {kernels.measure_read_bandwidth(1.0):.1f} GB/s")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        kernels.set_num_threads(args.threads)
    if args.profile == "decode":
        llm = _load_llm(args.model)
        text = read_default_corpus(4 * args.prompt_tokens + 1000)
        prompt = llm.tokenizer.encode(text, disallowed_special=())[:args.prompt_tokens]
        print(f"{llm.model}; isa={kernels.get_isa()}, threads={kernels.get_num_threads()}", flush=True)
        print(bench.profile_decode(llm.model, prompt, args.tokens).table())
        return 0
    print(f"pyllm kernels vs numpy: isa={kernels.get_isa()}, threads={kernels.get_num_threads()} "
          f"(numpy uses its BLAS's own threads)", flush=True)
    print(bench.format_table(bench.run(scale=args.scale, min_time=args.min_time)))
    return 0


def _cmd_tokenize_train(args: argparse.Namespace) -> int:
    sources = [Path(p) for p in args.data] if args.data else default_corpus_files()
    for path in sources:
        if not path.exists():
            print(f"pyllm tokenize train: no such file or folder: {path}", file=sys.stderr)
            return 2
    if not args.data:
        print(f"no --data: training on the Python standard library's sources ({len(sources)} files)")
    tok = Tokenizer.train(sources, args.vocab_size, pattern=args.pattern,
                          special_tokens=args.special, min_frequency=args.min_frequency)
    tok.save(args.out, format=args.format)
    print(f"wrote {args.out}: {tok.vocab_size} tokens ({len(tok.merges)} merges, "
          f"{len(tok.special_tokens)} special), pattern {args.pattern}, format {args.format}")
    return 0


def _load_tokenizer(path: str):
    return Tokenizer.load(path)


def _cmd_tokenize_encode(args: argparse.Namespace) -> int:
    tok = _load_tokenizer(args.tokenizer)
    text = open(args.file, encoding="utf-8").read() if args.file else args.text
    if text is None:
        text = sys.stdin.read()
    ids = tok.encode(text, allowed_special="all" if args.allow_special else ())
    print(" ".join(map(str, ids)))
    if not args.ids_only:
        escapes = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t", "|": "\\|"})
        pieces = [tok.token_to_bytes(i).decode("utf-8", errors="backslashreplace").translate(escapes)
                  for i in ids]
        print("|".join(pieces))
        print(f"{len(ids)} tokens, {len(text.encode('utf-8'))} bytes")
    if args.html:
        tokens = [(i, piece(tok, i)) for i in ids]
        body = (f"<h1>How {report.escape(Path(args.tokenizer).name)} cuts the text</h1>"
                f'<div class="meta">{len(ids)} tokens, {len(text.encode("utf-8"))} bytes, '
                f"{len(text.encode('utf-8')) / max(1, len(ids)):.2f} bytes per token</div>"
                + report.token_strip(tokens))
        path = report.write(args.html, report.page("pyllm tokenize", body))
        if not args.ids_only:
            print(f"wrote {path}")
    return 0


def _cmd_tokenize_decode(args: argparse.Namespace) -> int:
    tok = _load_tokenizer(args.tokenizer)
    try:
        ids = [int(x) for x in " ".join(args.ids).replace(",", " ").split()]
    except ValueError as exc:
        print(f"pyllm tokenize decode: ids must be integers ({exc})", file=sys.stderr)
        return 2
    print(tok.decode(ids))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    fields["progress"] = not args.no_progress
    cfg = TrainConfig(**fields)
    try:
        result = train(cfg)
    except TrainingInterrupted as exc:
        if not getattr(exc, "quiet", False):   # under mpirun, rank 0 alone says it
            print(f"\npyllm train: {exc}", file=sys.stderr)
        return 130
    except TrainingError as exc:
        if not getattr(exc, "quiet", False):
            print(f"pyllm train: error: {exc}", file=sys.stderr)
        return 1
    if not result.is_root:
        return 0
    out = Path(cfg.out_dir)
    last_val = next((r for r in reversed(result.history) if "val_loss" in r), None)
    if last_val:
        print(f"step {last_val['step']}: validation loss {last_val['val_loss']:.4f} "
              f"(perplexity {last_val['val_ppl']:.2f})")
    png = plot_losses(out / "log.jsonl", out / "loss.png")
    print(f"model, tokenizer and log in {out}/; curves in {out / REPORT}" + (f" and {png}" if png else ""))
    if args.sample_tokens:
        tok = result.tokenizer
        prompt = (tok.encode(args.prompt) or [0])[-(result.model.config.block_size // 2):]
        ids = result.model.generate(prompt, min(args.sample_tokens, result.model.config.block_size - len(prompt)),
                                    temperature=0.8, top_k=50, seed=cfg.seed)
        print("--- sample ---")
        print(tok.decode(ids.tolist()))
    return 0


def _load_llm(model: str | None, adapter: str | None = None):
    """The model, with a LoRA adapter folder (peft's files: pyllm's or peft's own) on top if given."""
    if model is None:   # (the fetch, when there is one, says so itself)
        print(f"(no --model: using {DEFAULT_MODEL})", file=sys.stderr)
        model = DEFAULT_MODEL
    llm = LLM.load(model)
    if adapter:
        llm.model.lora = LoRA.load(llm.model, adapter)
        print(f"(adapter {adapter}: rank {llm.model.lora.config.rank} on {', '.join(llm.model.lora.targets)})",
              file=sys.stderr)
    return llm


def _sampling_options(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def _cmd_generate(args: argparse.Namespace) -> int:
    llm = _load_llm(args.model, args.adapter)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    options = _sampling_options(args)
    if not args.show_probs:
        print(prompt, end="", flush=True)
        for piece in llm.generate(prompt, args.max_new_tokens, stream=True, stop=args.stop or (),
                                  context_shift=args.context_shift, **options):
            print(piece, end="", flush=True)
        print()
        return 0
    # One line per step: the token drawn and the distribution it was drawn from.
    ids = llm.encode_prompt(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give some text to continue")
    seed = options.pop("seed")
    sampling = SamplingConfig(**options)
    print(f"prompt: {prompt!r} ({len(ids)} tokens)")
    text = b""
    for step, (tokens, probs, _) in enumerate(generate_stream(llm.model, ids, args.max_new_tokens, sampling,
                                                           llm.stop_token_ids, seed, with_probs=True)):
        token = int(tokens[0])
        top = ", ".join(f"{piece!r} {p:.3f}" for piece, p in top_probabilities(probs[0], llm.tokenizer, args.show_probs))
        piece = llm.tokenizer.token_to_bytes(token).decode("utf-8", errors="backslashreplace") \
            if token < llm.tokenizer.vocab_size else "?"
        print(f"{step + 1:4d}  {piece!r:>14}  p={probs[0, token]:.3f}   top: {top}")
        text += llm.tokenizer.decode_bytes([token]) if token < llm.tokenizer.vocab_size else b""
        if token in llm.stop_token_ids:
            break
    print("---")
    print(prompt + text.decode("utf-8", errors="replace"))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    llm = _load_llm(args.model, args.adapter)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    explanation = llm.explain(prompt, args.show, args.temperature, generate=args.generate,
                              sample_top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    print(explanation.table())
    if args.html:
        print(f"wrote {explanation.to_html(args.html)} (open it in a browser; it needs no network)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    llm = _load_llm(args.model, args.adapter)
    text = Path(args.file).read_text(encoding="utf-8") if args.file != "-" else sys.stdin.read()
    print(llm.perplexity(text, args.context, progress=not args.no_progress))
    return 0


def _cmd_finetune_sft(args: argparse.Namespace) -> int:
    if args.example:
        finetune.write_jsonl(args.data, finetune.arithmetic_examples(args.example, seed=args.seed))
        print(f"wrote {args.example} arithmetic examples to {args.data}")
    llm = _finetune_llm(args.model, args.lora_rank)
    examples = finetune.read_examples(args.data, llm, skip_bad=args.skip_bad)
    cfg = _finetune_config(args)
    train, val = finetune.split(examples, cfg.val_fraction, cfg.seed)
    print(f"{len(train)} training and {len(val)} validation examples; {llm.model}")
    if val and not args.resume:   # on float activations, as training and the saved float model compute
        with finetune.exact_products(llm.model):
            print(f"validation loss before: {finetune.masked_loss(llm.model, val):.4f}")
    records = finetune.sft(llm, train, val, cfg, out_dir=args.out, progress=not args.no_progress)
    if val:
        print(f"validation loss after: {records[-1]['val_loss']:.4f}")
    print(f"fine-tuned model in {args.out} (pyllm chat --model {args.out})")
    return 0


def _finetune_llm(model_arg, lora_rank: int):
    """The model to tune: a GGUF file stays quantized under LoRA adapters, else is expanded to
    float32 (every weight trains)."""
    return LLM.load(model_arg or DEFAULT_MODEL, dequantize=not lora_rank)


def _finetune_config(args: argparse.Namespace):
    return finetune.SFTConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                              checkpoint_interval=args.checkpoint_interval, resume=args.resume,
                              overwrite=args.overwrite, distributed=args.distributed)


# DPO's default learning rates: LoRA adapters start at zero and need a rate like SFT's (5e-6 moved
# nothing in 60 steps: loss 0.69315 -> 0.69314); all weights at once take a far smaller one.
DPO_LORA_LR, DPO_FULL_LR = 3e-4, 5e-6


def _cmd_finetune_dpo(args: argparse.Namespace) -> int:
    if args.lr is None:
        args.lr = DPO_LORA_LR if args.lora_rank else DPO_FULL_LR
    if args.example:
        finetune.write_jsonl(args.data, finetune.arithmetic_preferences(args.example, seed=args.seed))
        print(f"wrote {args.example} arithmetic preference pairs to {args.data}")
    llm = _finetune_llm(args.model, args.lora_rank)
    pairs = finetune.read_pairs(args.data, llm, skip_bad=args.skip_bad)
    train, val = finetune.split(pairs, 0.1, args.seed)
    if val and not args.resume:
        with finetune.exact_products(llm.model):
            print(f"held-out preference accuracy before: {finetune.preference_accuracy(llm.model, val):.1%} (pairs "
                  f"whose chosen answer the model finds likelier)")
    records = finetune.dpo(llm, train, _finetune_config(args), beta=args.beta, out_dir=args.out,
                           progress=not args.no_progress)
    last = records[-1]
    print(f"last step (a training batch): loss {last['loss']:.4f}, reward margin {last['reward_margin']:.4f}, "
          f"reward accuracy {last['accuracy']:.0%} (pairs whose reward against the starting model prefers the "
          f"chosen answer)")
    if val:
        print(f"held-out preference accuracy after: {finetune.preference_accuracy(llm.model, val):.1%} (pairs whose "
              f"chosen answer the model finds likelier)")
    print(f"tuned model in {args.out} (pyllm chat --model {args.out})")
    return 0


CHAT_HELP = """commands:
  /reset   forget the conversation (keeps the system prompt)
  /help    this text
  /exit    quit (Ctrl-D does too)
Ctrl-C while the model answers stops the answer; the conversation goes on."""


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.threads:
        kernels.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get("PYLLM_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"(serving on {args.host} without --api-key: anyone who can reach it can use it)", file=sys.stderr)
    name = args.name or (Path(args.model).stem if args.model else DEFAULT_MODEL)
    config = EngineConfig(max_batch=args.max_batch, max_queue=args.max_queue, context=args.context,
                          prefix_rows=args.prefix_cache)
    print(f"pyllm serve: http://{args.host}:{args.port}/ (model {name!r}; /health answers 503 until it "
          f"is loaded)", file=sys.stderr)
    serve(lambda: _load_llm(args.model, args.adapter), name, args.host, args.port, api_key, config,
          log_level="warning" if args.quiet else "info")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    llm = _load_llm(args.model, args.adapter)
    llm.save_gguf(args.out, args.type)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {llm.model.config.arch}, {args.type}, {size / 1e6:.1f} MB", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    llm = _load_llm(args.model, args.adapter)
    options = _sampling_options(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    reserve = min(args.max_new_tokens, llm.context_window // 4)
    print(f"pyllm chat: {llm.model} ({'its own' if llm.chat_template else 'a plain'} chat template, "
          f"context {llm.context_window} tokens). /help for commands, Ctrl-D to quit.")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/help":
            print(CHAT_HELP)
            continue
        if text == "/reset":
            history = list(system)
            print("(conversation reset)")
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; /help lists them")
            continue
        history.append({"role": "user", "content": text})
        dropped = 0
        while llm.count_tokens(history) > llm.context_window - reserve and len(history) > len(system) + 1:
            del history[len(system):len(system) + 2]   # the oldest user turn and its answer
            dropped += 1
        if dropped:
            print(f"(the conversation outgrew the {llm.context_window}-token context: "
                  f"dropped the {dropped} oldest turn(s))")
        if llm.count_tokens(history) >= llm.context_window:
            print(f"(that message is too long for the {llm.context_window}-token context; try a shorter one)")
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        pieces = []
        try:
            for piece in llm.chat(history, args.max_new_tokens, stream=True, context_shift=args.context_shift,
                                  **options):
                print(piece, end="", flush=True)
                pieces.append(piece)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a model folder (e.g. what `pyllm train` writes), a .gguf file, or "
                                   "smollm2-135m-instruct (the default)")
    p.add_argument("--adapter", help="a LoRA adapter folder (adapter_config.json + adapter_model.safetensors, "
                                     "as pyllm finetune or peft saves it) to apply to the model")


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    _add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="keep the k likeliest tokens (default 50; 0: off)")
    p.add_argument("--top-p", type=float, help="keep the likeliest tokens up to this mass (nucleus)")
    p.add_argument("--min-p", type=float, help="drop tokens below this fraction of the likeliest")
    penalty = CHAT_REPETITION_PENALTY if p.prog.endswith("chat") else 1.0
    p.add_argument("--repetition-penalty", type=float, default=penalty, help=f"> 1 discourages repeats "
                                                                            f"(default {penalty:g})")
    p.add_argument("--seed", type=int, help="same seed, same text")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The `pyllm` parser, and the subcommands a --config file may fill ((words...) -> their parser)."""
    parser = argparse.ArgumentParser(prog="pyllm", description="A readable LLM stack with C++ kernels.")
    parser.add_argument("--version", action="version", version=f"pyllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show the SIMD level and thread count the kernels use")
    info.add_argument("--peak", action="store_true", help="also measure the fp32 FMA peak and the memory read bandwidth")
    info.set_defaults(func=_cmd_info)
    bench = sub.add_parser("bench", help="time the C++ kernels against their numpy twins (about a minute)")
    bench.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    bench.add_argument("--scale", type=float, default=1.0,
                       help="shrink (<1) or grow the GPT-2-small shapes (default 1.0)")
    bench.add_argument("--profile", choices=["decode"],
                       help="instead: where a decode step's time goes, by operation (with --model)")
    bench.add_argument("--model", help="for --profile: a model folder, a .gguf file, or smollm2-135m-instruct")
    bench.add_argument("--prompt-tokens", type=int, default=500, help="for --profile: context before decoding")
    bench.add_argument("--tokens", type=int, default=100, help="for --profile: tokens decoded")
    bench.add_argument("--min-time", type=float, default=0.5,
                       help="seconds spent timing each side of each kernel (default 0.5)")
    bench.set_defaults(func=_cmd_bench)

    tokenize = sub.add_parser("tokenize", help="train a BPE tokenizer, or look at how text tokenizes")
    tsub = tokenize.add_subparsers(dest="tokenize_command", metavar="ACTION", required=True)
    train = tsub.add_parser("train", help="learn a byte-level BPE tokenizer from text files")
    train.add_argument("--data", nargs="+", metavar="PATH",
                       help="text files or folders (default: the Python standard library's sources)")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in all, specials included")
    train.add_argument("--out", required=True, help="file to write")
    train.add_argument("--pattern", default="gpt4", help="gpt4 (default), gpt2, or a regex of your own")
    train.add_argument("--special", nargs="*", default=[], metavar="TOKEN", help="special tokens, e.g. '<|endoftext|>'")
    train.add_argument("--min-frequency", type=int, default=0, help="stop when no pair occurs this often")
    train.add_argument("--format", choices=["pyllm", "hf"], default="pyllm",
                       help="pyllm's JSON (default) or a Hugging Face tokenizer.json")
    train.set_defaults(func=_cmd_tokenize_train)
    encode = tsub.add_parser("encode", help="show the token ids and pieces of a text")
    encode.add_argument("--tokenizer", required=True, help="a pyllm tokenizer JSON or a tokenizer.json")
    encode.add_argument("text", nargs="?", help="the text (default: --file, else standard input)")
    encode.add_argument("--file", help="read the text from this file")
    encode.add_argument("--allow-special", action="store_true", help="encode special-token text as the special tokens")
    encode.add_argument("--ids-only", action="store_true", help="print the ids only")
    encode.add_argument("--html", metavar="FILE", help="also write the token strip (pieces and ids) as an HTML page")
    encode.set_defaults(func=_cmd_tokenize_encode)
    decode = tsub.add_parser("decode", help="turn token ids back into text")
    decode.add_argument("--tokenizer", required=True, help="a pyllm tokenizer JSON or a tokenizer.json")
    decode.add_argument("ids", nargs="+", help="token ids (spaces or commas)")
    decode.set_defaults(func=_cmd_tokenize_decode)
    train_parser = _add_train_parser(sub)
    gen = sub.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("prompt", nargs="?", help="the text to continue (default: standard input)")
    _add_sampling_flags(gen, 100)
    gen.add_argument("--stop", action="append", metavar="TEXT", help="end the text where this appears (not "
                                                                      "shown); may be given several times")
    _add_context_shift_flag(gen)
    gen.add_argument("--show-probs", type=int, nargs="?", const=5, default=0, metavar="K",
                     help="print each step's K likeliest next tokens and their probabilities (default K=5)")
    gen.set_defaults(func=_cmd_generate)
    explain = sub.add_parser("explain", help="show how the model decides the next token (tokens, probabilities, "
                                             "attention, logit lens; --html for a page)",
                             description="Runs the prompt once with the model's insides kept and prints its tokens, "
                                         "the next-token table and each layer's logit-lens guess; --generate N adds "
                                         "a step-by-step trace of N sampled tokens; --html FILE writes all of it, "
                                         "with every layer's and head's attention map, as one offline HTML page.")
    explain.add_argument("prompt", nargs="?", help="the text (default: standard input)")
    _add_model_flags(explain)
    explain.add_argument("--generate", type=int, default=0, metavar="N", help="also generate N tokens, traced")
    explain.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1: the model's own p)")
    explain.add_argument("--top-k", type=int, default=0, help="the sampler keeps the k likeliest (default 0: off)")
    explain.add_argument("--top-p", type=float, help="the sampler keeps the likeliest up to this mass")
    explain.add_argument("--min-p", type=float, help="the sampler drops tokens below this fraction of the likeliest")
    explain.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    explain.add_argument("--seed", type=int, help="same seed, same trace")
    explain.add_argument("--show", type=int, default=10, metavar="K", help="rows of the next-token table (default 10)")
    explain.add_argument("--html", metavar="FILE", help="write the whole explanation as a self-contained HTML page")
    explain.set_defaults(func=_cmd_explain)
    ev = sub.add_parser("eval", help="a model's perplexity on a text file (as llama-perplexity measures it)",
                        description="Cuts the file's tokens into windows of --context tokens, scores every token "
                                    "but each window's first from the ones before it in the window, and prints "
                                    "exp(mean negative log-likelihood).")
    ev.add_argument("file", help="a UTF-8 text file ('-': standard input)")
    _add_model_flags(ev)
    ev.add_argument("--context", type=int, help="tokens per window (default: the model's window, at most 1024)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_eval)
    chat = sub.add_parser("chat", help="talk with a model, turn after turn")
    _add_sampling_flags(chat, 256)
    chat.add_argument("--system", help="a system prompt")
    _add_context_shift_flag(chat)
    chat.set_defaults(func=_cmd_chat)
    exp = sub.add_parser("export", help="write a model as a GGUF file (llama.cpp, Ollama)",
                         description="Writes a model folder or GGUF file (with --adapter, merged) as one GGUF "
                                     "file with its tokenizer and chat template, for llama.cpp and Ollama. "
                                     "Needs the export extra: pip install \"pyllm[export]\".")
    exp.add_argument("--model", help="a model folder, a .gguf file, or smollm2-135m-instruct (the default)")
    exp.add_argument("--adapter", help="a LoRA adapter folder, merged into the written weights")
    exp.add_argument("--out", required=True, help="the .gguf file to write")
    exp.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k"],
                     help="how the matrices are stored (default f16; norms and biases stay f32; q4_k "
                          "matrices whose rows are not whole 256-value blocks are q8_0)")
    exp.set_defaults(func=_cmd_export)
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a chat page",
                         description="Serves one model over HTTP as OpenAI's API does (/v1/chat/completions, "
                                     "/v1/completions, /v1/embeddings, /v1/models), with /health, /metrics, "
                                     "/tokenize, /detokenize and a chat page at /. Requests decode together "
                                     "(continuous batching). Needs the serve extra: pip install \"pyllm[serve]\".")
    srv.add_argument("--model", help="a model folder, a .gguf file, or smollm2-135m-instruct (the default)")
    srv.add_argument("--adapter", help="a LoRA adapter folder to apply on top of the model")
    srv.add_argument("--name", help="the model's id in the API (default: the file's or folder's name)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $PYLLM_API_KEY, else none)")
    srv.add_argument("--max-batch", type=int, default=8, help="requests generating at once (default 8)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    srv.add_argument("--context", type=int, help="tokens per request, prompt and reply (default: the model's, at most 4096)")
    srv.add_argument("--prefix-cache", type=int, default=4, metavar="ROWS",
                     help="finished conversations whose keys and values are kept for the next turn (default 4; 0: no reuse)")
    srv.add_argument("--threads", type=int, help="kernel threads (default: all cores)")
    srv.add_argument("--quiet", action="store_true", help="no access log")
    srv.set_defaults(func=_cmd_serve)
    finetune = sub.add_parser("finetune", help="fine-tune a model on example conversations")
    fsub = finetune.add_subparsers(dest="finetune_command", metavar="METHOD", required=True)
    sft = fsub.add_parser("sft", help="supervised fine-tuning: learn the assistant turns of JSONL examples",
                          description="Fine-tunes every parameter (or LoRA adapters) on JSONL lines of {'messages': [...]} or "
                                      "{'prompt', 'completion'}; only the assistant's tokens are learned.")
    sft.add_argument("--model", help="a model folder, a .gguf file, or smollm2-135m-instruct (the default)")
    sft.add_argument("--data", required=True, help="a JSONL file of examples")
    sft.add_argument("--out", required=True, help="folder for the fine-tuned model")
    sft.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default 3)")
    sft.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    sft.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    sft.add_argument("--seed", type=int, default=0, help="seed for shuffling and the example data")
    sft.add_argument("--skip-bad", action="store_true", help="leave out bad lines instead of stopping")
    _add_finetune_flags(sft)
    sft.add_argument("--example", type=int, metavar="N",
                     help="first write N generated arithmetic question/answer examples to --data")
    sft.add_argument("--no-progress", action="store_true", help="no progress bar")
    sft.set_defaults(func=_cmd_finetune_sft)
    dpo = fsub.add_parser("dpo", help="preference tuning (DPO) on JSONL prompt/chosen/rejected pairs",
                          description="Direct preference optimisation against the model as it was before "
                                      "training (its log-probabilities computed once as the reference).")
    dpo.add_argument("--model", help="a model folder, a .gguf file, or smollm2-135m-instruct (the default)")
    dpo.add_argument("--data", required=True, help='a JSONL file of {"prompt", "chosen", "rejected"} lines')
    dpo.add_argument("--out", required=True, help="folder for the tuned model")
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO's beta (default 0.1)")
    dpo.add_argument("--epochs", type=float, default=1.0, help="passes over the pairs (default 1)")
    dpo.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    dpo.add_argument("--lr", type=float, help=f"peak learning rate (default {DPO_LORA_LR:g} with --lora-rank, "
                                              f"{DPO_FULL_LR:g} for all weights)")
    _add_finetune_flags(dpo)
    dpo.add_argument("--seed", type=int, default=0, help="seed for shuffling and the example data")
    dpo.add_argument("--skip-bad", action="store_true", help="leave out bad lines instead of stopping")
    dpo.add_argument("--example", type=int, metavar="N",
                     help="first write N generated arithmetic preference pairs to --data")
    dpo.add_argument("--no-progress", action="store_true", help="no progress bar")
    dpo.set_defaults(func=_cmd_finetune_dpo)
    return parser, {("train",): train_parser, ("finetune", "sft"): sft, ("finetune", "dpo"): dpo}


def main(argv: list[str] | None = None) -> int:
    parser, configurable = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = _with_config(parser, configurable, argv)
    except (ValueError, OSError) as exc:
        print(f"pyllm: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.command in ("train", "finetune") and not distributed.connect(args.distributed or "auto").is_root:
            sys.stdout = open(os.devnull, "w")   # under mpirun rank 0 alone reports
        with warnings.catch_warnings():   # a warning is a note to the user, not a source line
            warnings.showwarning = lambda message, *_, **__: print(f"pyllm {args.command}: {message}",
                                                                   file=sys.stderr)
            return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError) as exc:  # bad input: a message, not a traceback
        if not getattr(exc, "quiet", False):   # under mpirun every rank raises it; rank 0 says it
            print(f"pyllm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:   # a loop's own (it saved first, and says where), or any other
        if not getattr(exc, "quiet", False):
            print(f"\npyllm {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130


def _add_context_shift_flag(parser) -> None:
    parser.add_argument("--context-shift", action="store_true",
                        help="when a reply reaches the context window, drop the oldest half of the text after "
                             "the prompt's start and go on (default: stop, and say so)")


def _add_config_flag(parser) -> None:
    parser.add_argument("--config", metavar="FILE.toml",
                        help="settings from a TOML file, named as this command's flags (n_layer = 6, lr = 3e-4, "
                             "lora-rank = 16, resume = true, ...); flags given as well win")


def config_arguments(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A TOML file's settings as the command-line flags they name (dashes or underscores; a list is
    the flag's values; true switches a flag on, false leaves it off), checked against `parser`'s
    flags, so the file takes exactly what the command line takes."""
    if tomllib is None:
        raise ValueError(f"{path}: reading a TOML config needs Python 3.11 or later (tomllib)")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    flags = parser._option_string_actions   # option string -> argparse action
    unknown = sorted(key for key in doc if "--" + key.replace("_", "-") not in flags or key in ("config", "help"))
    if unknown:
        known = sorted(o[2:] for o, a in flags.items() if o.startswith("--") and o not in ("--help", "--config"))
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out: list[str] = []
    for key, value in doc.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value != (flags[flag].nargs == 0):   # a switch set false, or true/false for a valued flag
                if flags[flag].nargs == 0:
                    continue
                raise ValueError(f"{path}: {key} takes a value, not {str(value).lower()}")
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        elif isinstance(value, (str, int, float)):
            out += [flag, str(value)]
        else:
            raise ValueError(f"{path}: {key} must be a string, a number, a boolean or a list, got {value!r}")
    return out


def _with_config(parser: argparse.ArgumentParser, commands: dict, argv: list[str]) -> list[str]:
    """argv with a --config file's settings put in front of the command's own flags (which then win)."""
    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        parser.error("--config needs a file")
    path, rest = argv[at + 1], argv[:at] + argv[at + 2:]
    for words, sub in commands.items():
        if tuple(rest[:len(words)]) == words:
            return list(words) + config_arguments(sub, path) + rest[len(words):]
    parser.error("--config belongs to train, finetune sft and finetune dpo")


def _add_finetune_flags(parser) -> None:
    """What SFT and DPO share: adapters, checkpoints, resume, MPI and a --config file."""
    _add_config_flag(parser)
    parser.add_argument("--distributed", choices=["auto", "mpi", "none"], default="auto",
                        help="auto (default): data-parallel over MPI when started by mpirun with several ranks "
                             "(each takes every N-th example of a batch); mpi: require it; none: one process")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train LoRA adapters of this rank on a frozen base (a GGUF base stays quantized); "
                             "0: all weights")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (default 16)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    parser.add_argument("--checkpoint-interval", type=int, default=50, metavar="STEPS",
                        help="save a checkpoint in OUT/checkpoint every STEPS steps (default 50); Ctrl-C saves one too")
    parser.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (else refused)")


def _add_train_parser(sub) -> argparse.ArgumentParser:
    train = sub.add_parser("train", help="pretrain a model by next-token prediction",
                           description="Pretrain a model (GPT-2, Llama, Qwen2 or Qwen3 shaped). With no --data, "
                                       "the corpus is the Python standard library's sources; with no "
                                       "--tokenizer, a BPE tokenizer is trained on the data first.")
    _add_config_flag(train)
    train.add_argument("--data", nargs="+", metavar="PATH", help="text files, folders or JSONL (\"text\" field)")
    train.add_argument("--tokenizer", help="a tokenizer file to use instead of training one")
    train.add_argument("--out", dest="out_dir", help="output folder (default: out)")
    train.add_argument("--preset", choices=sorted(ModelConfig.PRESETS) + sorted(ModelConfig.SHAPED_PRESETS),
                       default="small", help="model size (default: small = 6 layers, 6 heads, 384 wide, block "
                                             "256), or a released model's shape")
    train.add_argument("--arch", choices=list(ARCHITECTURES),
                       help="architecture (default: gpt2, or the shaped preset's): llama, qwen3 and gemma3 as "
                            "people train them today (rotary, RMSNorm, gated MLP, grouped-query attention; gemma3 "
                            "with sliding-window layers)")
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        train.add_argument("--" + name.replace("_", "-"), type=int, help=f"override the preset's {name}")
    train.add_argument("--vocab-size", type=int, help="tokenizer size when one is trained (default 8192)")
    train.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    train.add_argument("--max-steps", type=int, help="optimizer steps (default 1000)")
    train.add_argument("--max-minutes", type=float, help="stop after this much time (checkpoint saved)")
    train.add_argument("--stop-at-step", type=int,
                       help="stop at this step with a checkpoint (the schedule still plans --max-steps)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    train.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default 1e-4)")
    train.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 50)")
    train.add_argument("--weight-decay", type=float, help="AdamW decay of matmul weights (default 0.1)")
    train.add_argument("--grad-clip", type=float, help="clip gradients to this global norm (default 1.0)")
    train.add_argument("--eval-interval", type=int, help="steps between validation runs (default 100)")
    train.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default 10)")
    train.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (default 200)")
    train.add_argument("--seed", type=int, help="seed for weights and batches (default 0)")
    train.add_argument("--threads", type=int, help="kernel threads per process (default: all cores, shared "
                                                   "out among the MPI ranks on a machine)")
    train.add_argument("--distributed", choices=["auto", "mpi", "none"],
                       help="auto (default): data-parallel over MPI when started by mpirun with several ranks; "
                            "mpi: require it; none: one process")
    train.add_argument("--zero", type=int, choices=[0, 1],
                       help="1: ZeRO-1, AdamW's moments sharded across the MPI ranks (default 0)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--extend-schedule", action="store_true",
                       help="with --resume and a new --max-steps: go on from the learning rate the run had, along "
                            "a new cosine down to --min-lr at the new last step (without it a changed --max-steps "
                            "is refused: it would redraw the schedule)")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (else refused)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--sample-tokens", type=int, default=100, help="tokens to sample at the end (0: none)")
    train.add_argument("--prompt", default="def ", help="prompt of that sample (default: 'def ')")
    train.set_defaults(func=_cmd_train)
    return train


if __name__ == "__main__":
    sys.exit(main())
