"""Regenerate the README's results table from benchmarks/results/*.json.

The table sits between `<!-- results:begin -->` and `<!-- results:end -->`.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _percent(fraction) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f}%"


def rtn_table(payload: dict) -> str:
    rows = payload["rows"]
    base = rows[0]
    lines = [
        f"RTN on SmolLM2-135M ({payload['date']}; `benchmarks/rtn.py` → `benchmarks/results/rtn_smollm2.json`). "
        f"WikiText-2 test, {payload['protocol']['wikitext2_windows']} × 512 tokens; built-in corpus (pydoc), "
        f"{payload['protocol']['pydoc_windows']} × 512; KL and top-1 agreement against fp32 on "
        f"{payload['protocol']['agreement_windows']} WikiText-2 windows. Quantised: {payload['protocol'].get('quantised', 'decoder block linears')}.",
        "",
        "| recipe | WikiText-2 ppl | Δ vs fp32 | pydoc ppl | KL | top-1 | stored MB | × smaller | compress s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wiki = r.get("wikitext2_perplexity")
        delta = None if wiki is None or base.get("wikitext2_perplexity") is None else 100 * (wiki / base["wikitext2_perplexity"] - 1)
        lines.append(
            f"| {r['name']} | {_fmt(wiki, '.2f')} | {'—' if delta is None else f'{delta:+.1f}%'} | "
            f"{_fmt(r.get('pydoc_perplexity'), '.2f')} | {_fmt(r.get('kl'), '.4f')} | "
            f"{_percent(r.get('top1_agreement'))} | "
            f"{r['stored_bytes'] / 1e6:.1f} | {base['stored_bytes'] / r['stored_bytes']:.2f} | "
            f"{_fmt(r.get('compress_seconds'), '.1f')} |"
        )
    return "\n".join(lines)


def study_table(payload: dict) -> str:
    lines = [f"W8A32 / W32A8 / W8A8 study (`slimformer study-w8a8`, {payload['date']}; `benchmarks/results/study_w8a8.json`).", ""]
    for model, result in payload["models"].items():
        metric = result["metric"]
        lines += [f"**{model}** ({metric.replace('_', ' ')} on {result['data']['name']})", "",
                  f"| variant | {metric.replace('_', ' ')} |", "|---|---|"]
        lines += [f"| {r['variant']} | {r[metric]:.4f} |" for r in result["rows"]]
        lines.append("")
    return "\n".join(lines).rstrip()


def lmeval_table(payload: dict) -> str:
    lines = [f"Zero-shot scoring against lm-evaluation-harness {payload['lm_eval_version']} on the same examples "
             f"(SmolLM2-135M fp32, first {payload['limit']} of each task; `benchmarks/lmeval_crosscheck.py`). "
             f"Largest per-request log-likelihood difference: {max(payload['max_abs_loglikelihood_diff'].values()):.1e}.", "",
             "| task | metric | slimformer | lm-eval |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['ours']:.4f} | {r['lm_eval']:.4f} |" for r in payload["table"]]
    return "\n".join(lines)


def kernels_table(payload: dict) -> str:
    cold, summed = payload["cold_decode_pass_M1"], payload["model_sum_30_layers_plus_lm_head"]
    lines = [f"CPU matmul kernels on SmolLM2-135M's linear shapes (`benchmarks/kernels.py` → "
             f"`benchmarks/results/kernels.json`; 2 threads; streaming read {payload['stream_read_GBps']:.1f} GB/s). "
             "Decode: one token through 30 distinct layers + LM head (weights streamed from memory, as in real decoding). "
             "Prefill: sum over the model's shapes at 512 tokens. Linear layers only, not end-to-end decode.", "",
             "| format | weight MB read / token | decode ms | decode × fp32 | prefill × fp32 |", "|---|---|---|---|---|"]
    for name, row in cold.items():
        prefill = summed["M=512"].get(name, {}).get("speedup_vs_fp32")
        lines.append(f"| {name} | {row['weight_bytes'] / 1e6:.1f} | {row['median_ms']:.2f} | "
                     f"{row['speedup_vs_fp32']:.2f} | {_fmt(prefill, '.2f')} |")
    return "\n".join(lines)


def runtime_table(payload: dict) -> str:
    speed, quality = payload["speed"], payload["quality"]
    llama = speed.get("llama.cpp", {}).get("decode_tok_s", {}).get("median")
    hf = speed.get("hf eager fp32", {}).get("decode_tok_s", {}).get("median")
    lines = [f"Runtime on SmolLM2-135M ({payload['date']}; `benchmarks/runtime.py` → `benchmarks/results/runtime.json`; "
             f"2 threads, all engines in one run, round-robin, {payload['protocol']['rounds']}). Decode: batch 1, "
             f"128 new tokens after a short prompt; prefill: 512 tokens. Roofline = measured streaming read "
             f"{payload['bandwidth_bytes_s'] / 1e9:.1f} GB/s ÷ weight bytes read per token. Perplexity: WikiText-2 test "
             f"40 × 512 on the runtime's prefill path, next to the dequantised model through Hugging Face; "
             f"the decode path itself (token by token) on 4 windows. `int8 act`: decode rounds activations to int8 "
             f"per block of 32 and multiplies with integer dot products, as llama.cpp does.", "",
             "| engine / weights | decode tok/s (min–max) | × llama.cpp | × HF | MB / token | % of roofline | "
             "prefill tok/s | ppl (runtime) | ppl (dequantised) | decode-path ppl, 4 win |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in speed.items():
        d = row.get("decode_tok_s", {})
        q = quality.get(name, {})
        base = quality.get(name.replace(", int8 act", ""), {})
        lines.append(
            f"| {name} | {_fmt(d.get('median'), '.1f')} ({_fmt(d.get('min'), '.0f')}–{_fmt(d.get('max'), '.0f')}) | "
            f"{_fmt(d['median'] / llama if llama and d else None, '.2f')} | {_fmt(d['median'] / hf if hf and d else None, '.2f')} | "
            f"{_fmt(row['bytes_per_token'] / 1e6 if row.get('bytes_per_token') else None, '.0f')} | "
            f"{_percent(row.get('roofline_fraction'))} | {_fmt(row.get('prefill_tok_s', {}).get('median'), '.0f')} | "
            f"{_fmt(q.get('prefill_path_ppl'), '.3f')} | {_fmt(base.get('dequantised_ppl'), '.3f')} | "
            f"{_fmt(q.get('decode_path_ppl_4win'), '.3f')} |")
    bp = payload.get("batched_prefill")
    if bp:
        lines += ["", f"Batched prefill with padding removal (fp32, {len(bp['lengths'])} prompts of "
                      f"{min(bp['lengths'])}–{max(bp['lengths'])} tokens, {100 * bp['padding_fraction']:.0f}% of a "
                      f"padded batch is padding): packed {bp['native packed']['real_tok_s']:.0f} real tok/s, "
                      f"padded {bp['native padded']['real_tok_s']:.0f} (packed is {bp['packed_over_padded']:.2f}× faster); "
                      f"HF eager padded {bp['hf eager padded']['real_tok_s']:.0f}."]
    return "\n".join(lines)


def padfree_table(payload: dict) -> str:
    s = payload["settings"]
    lines = [f"Padding removal on all-MiniLM-L6-v2 (`benchmarks/padfree.py` → `benchmarks/results/padfree.json`; "
             f"256 sentences, batch {s['batch_size']}, 2 threads, {s['statistic']} of {s['repeats']}; timed: {s['timed']}).",
             "", "| workload | tokens min–max | padding in batches | HF padded sent/s | HF sorted by length | "
                 "packed (padding-free) | max abs diff |", "|---|---|---|---|---|---|---|"]
    for name, w in payload["workloads"].items():
        m = w["methods"]
        def rate(key):
            row = m.get(key)
            return "—" if not row else f"{row['sentences_per_s']:.0f} ({row['speedup_vs_hf_padded']:.2f}×)"

        lines.append(f"| {name} | {w['tokens']['min']}–{w['tokens']['max']} | "
                     f"{100 * w['pad_fraction']['input_order']:.0f}% | {m['hf_padded']['sentences_per_s']:.0f} | "
                     f"{rate('hf_sorted')} | **{rate('padfree_loop')}** | "
                     f"{m['padfree_loop']['max_abs_diff_vs_hf_padded']:.1e} |")
    return "\n".join(lines)


def offload_table(payload: dict) -> str:
    lines = [f"Offloading SmolLM2-135M fp32 ({payload['weight_bytes'] / 1e6:.0f} MB of weights; "
             f"`benchmarks/offload.py` → `benchmarks/results/offload.json`): each run in a fresh process, peak RSS "
             f"(VmHWM) after a {payload['setup']['prompt_tokens']}-token forward and {payload['setup']['new_tokens']} "
             f"greedy tokens (HF engine), page cache warm. Greedy tokens identical in every run: "
             f"{payload['greedy_tokens_identical']}.", "",
             "| run | budget (share of weights) | block slots | peak RSS MiB | peak − imports MiB | 128-token forward s | decode tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["summary"]:
        frac = r.get("budget_fraction_of_weights")
        lines.append(f"| {r['name']} | {'—' if frac is None else f'{100 * frac:.0f}%'} | {r['resident_block_slots']} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['peak_rss_over_imports_bytes'] / 2**20:.0f} | "
                     f"{r['forward_128_s']:.3f} | {r['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines)


def tensor_parallel_table(payload: dict) -> str:
    lines = [f"Tensor parallelism over processes (`benchmarks/tensor_parallel.py` → "
             f"`benchmarks/results/tensor_parallel.json`; {payload['machine']['backend']}, 128-token forward). "
             f"On 2 cores it cannot be faster; it is there for several machines or GPUs. SmolLM2 at TP=2: "
             f"\"{payload.get('smollm2_tp2', '')}\".", "",
             "| model | TP | max abs logit diff vs 1 process | argmax agrees | 1 process, 2 threads s | TP s |",
             "|---|---|---|---|---|---|"]
    for r in payload["results"]:
        lines.append(f"| {r['model']} | {r['world_size']} | {r['max_abs_logit_diff']:.1e} | "
                     f"{r['argmax_agrees_at_every_position']} | {r['single_2_threads_forward_s']:.4f} | {r['tp_forward_s']:.4f} |")
    return "\n".join(lines)


def ptq_smollm2_table(payload: dict) -> str:
    rows = payload["rows"]
    base = next((r for r in rows if r["name"] == "fp32"), None)
    anchor = payload["protocol"]["anchor"]
    lines = [
        "Post-training quantisation suite on SmolLM2-135M (`benchmarks/ptq.py` → `benchmarks/results/ptq_smollm2.json`). "
        f"WikiText-2 test, {payload['protocol']['wikitext2_windows']} × 512 tokens; KL and top-1 agreement against fp32 on "
        f"{payload['protocol']['agreement_windows']} windows; calibration {payload['protocol']['calibration']}; stored MB = "
        "the saved `model.safetensors`; quantised: " + payload["protocol"].get("quantised", "decoder block linears")
        + " (an fp32 tied table is 113 MB of it); compress s on 2 threads. "
        f"Anchor: {anchor['tool']}: ppl {anchor['perplexity']} in {anchor['compress_seconds']:.0f} s."
        + (f" {payload['notes']}" if payload.get("notes") else ""),
        "",
        "| row | what | WikiText-2 ppl | Δ vs fp32 | KL | top-1 | stored MB | compress s | generate engine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = r.get("perplexity")
        delta = None if base is None or ppl is None or r is base else 100 * (ppl / base["perplexity"] - 1)
        engine = (r.get("generate") or {}).get("engine", "—")
        lines.append(
            f"| {r['name']} | {r.get('purpose', '')} | {_fmt(ppl, '.2f')} | {'—' if delta is None else f'{delta:+.1f}%'} | "
            f"{_fmt(r.get('kl'), '.4f')} | {_percent(r.get('top1_agreement'))} | {r['stored_bytes'] / 1e6:.1f} | "
            f"{_fmt(r.get('compress_seconds'), '.0f')} | {engine} |")
    return "\n".join(lines)


def ptq_minilm_table(payload: dict) -> str:
    lines = [
        "The same techniques on all-MiniLM-L6-v2 (`benchmarks/ptq.py --model minilm-l6` → "
        f"`benchmarks/results/ptq_minilm.json`): embedding cosine to fp32 on {payload['protocol']['sentences']}, "
        f"STS-B {payload['protocol']['stsb']} Spearman; calibration {payload['protocol']['calibration']}.",
        "",
        "| row | what | cosine mean | cosine min | STS-B Spearman | stored MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        cos = r.get("embedding_cosine") or {}
        lines.append(f"| {r['name']} | {r.get('purpose', '')} | {_fmt(cos.get('mean'), '.4f')} | {_fmt(cos.get('min'), '.4f')} | "
                     f"{_fmt((r.get('stsb') or {}).get('spearman'), '.4f')} | {r['stored_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def zeroquant_table(payload: dict) -> str:
    machine = payload["machine"]
    lines = [
        f"ZeroQuant's fused kernel, one SmolLM2 decoder layer's projections summed (`benchmarks/zeroquant.py` → "
        f"`benchmarks/results/zeroquant.json`, {payload['date']}; {machine['threads']} threads, kernel ISA "
        f"{machine['zeroquant_isa']}; {payload['protocol']['weights']}, activations {payload['protocol']['activations']}; "
        "round-robin medians). \"unfused\" is the same arithmetic as separate torch steps (quantise the tokens, "
        "dequantise the weight, `F.linear`).",
        "",
        "| tokens | fp32 µs | unfused µs | fused µs | fused vs fp32 | fused vs unfused |",
        "|---|---|---|---|---|---|",
    ]
    for m, sums in payload["one_smollm2_decoder_layer"].items():
        fp32, unfused, fused = (sums[k]["sum_us"] for k in ("fp32", "unfused", "zeroquant"))
        lines.append(f"| {m.removeprefix('M=')} | {fp32:.0f} | {unfused:.0f} | {fused:.0f} | "
                     f"{fp32 / fused:.2f}× | {unfused / fused:.1f}× |")
    return "\n".join(lines)


def sparsity_table(payload: dict) -> str:
    rows = {r["name"]: r for r in payload["rows"]}
    lines = [
        "Pruning on SmolLM2-135M (`benchmarks/sparsity.py` → `benchmarks/results/sparsity_smollm2.json`): WikiText-2 test "
        f"perplexity, {payload['protocol']['wikitext2_windows']} × 512 tokens; {payload['protocol']['pruned']}. Kept |W|: "
        "the fraction of Σ\\|W\\| the pruned projections keep (all of them, and the two whose inputs permutation can reorder: "
        "down_proj, o_proj). Compressed MB: the pruned projections in `SparseLinear` storage, fp32 values (dense fp32 in brackets).",
        "",
        "| one shot | sparsity | kept \\|W\\| | kept \\|W\\| down/o | perplexity | compressed MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        if r.get("part") != "oneshot":
            continue
        if r["name"] == "fp32":
            lines.append(f"| fp32 | 0 | 1 | 1 | {r['perplexity']:.2f} | |")
            continue
        lines.append(f"| {r['name']} | {r['sparsity']:.1%} | {r['kept_magnitude']:.4f} | {r['kept_magnitude_permutable']:.4f} | "
                     f"{r['perplexity']:.2f} | {r['compressed_bytes'] / 1e6:.1f} ({r['dense_fp32_bytes'] / 1e6:.1f}) |")
    recovery = [r for r in payload["rows"] if r.get("part") == "recovery"]
    if recovery:
        lines += ["", "Recovery by training on wiki.valid.tokens (never the test split); budget per row as stated "
                  "(steps × tokens per step).", "",
                  "| recovery | budget | sparsity | one-shot baseline | baseline ppl | perplexity | train s |",
                  "|---|---|---|---|---|---|---|"]
        for r in recovery:
            base = rows.get(r["baseline"], {}).get("perplexity")
            t = r["train"]
            lines.append(f"| {r['name']} | {t['steps']} × {t['tokens'] // max(1, t['steps'])} | {r['sparsity']:.1%} | "
                         f"{r['baseline']} | {_fmt(base, '.2f')} | {r['perplexity']:.2f} | {t['seconds']:.0f} |")
    workflow = rows.get("tiny-workflow")
    if workflow:
        p = workflow["perplexity"]
        lines += ["", f"Train → prune → retrain on a tiny model from scratch ({workflow['model']}; {workflow['data']}; "
                  f"{workflow['steps']['dense']} dense steps, {workflow['steps']['retrain']} retraining steps): perplexity "
                  f"random init {p['random_init']:.1f} → dense trained {p['dense_trained']:.2f} → 2:4 one shot "
                  f"{p['one_shot_2_4']:.2f} → retrained with the 2:4 mask {p['retrained_2_4_masked']:.2f}, "
                  f"with STE {p['retrained_2_4_ste']:.2f}, with SR-STE {p['retrained_2_4_srste']:.2f}."]
    return "\n".join(lines)


def oneshot_pruning_table(payload: dict) -> str:
    rows = {r["name"]: r for r in payload["rows"]}
    fp32 = rows.get("fp32", {}).get("perplexity")
    lines = [
        "One-shot pruning from calibration on SmolLM2-135M (`benchmarks/oneshot_pruning.py` → "
        "`benchmarks/results/oneshot_pruning_smollm2.json`): WikiText-2 test perplexity, "
        f"{payload['protocol']['wikitext2_windows']} × 512 tokens (fp32 {_fmt(fp32, '.2f')}); "
        f"{payload['protocol']['pruned']}; calibration from wiki.valid.tokens (per row). Compress s: wall seconds of "
        "`compress` at the stated threads on a shared 2-core machine, with the process's CPU seconds in brackets "
        "(1-minute load average before → after the row: above the thread count, other jobs shared the cores and the "
        "wall time is inflated). Magnitude rows come from `benchmarks/sparsity.py` (same protocol). Anchors: "
        "llm-compressor 0.14 on this machine type, 2 threads.",
        "",
        "| method | pattern | permuted | sparsity | perplexity | compress s | threads | load avg | calibration | anchor ppl / s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        if r["name"] == "fp32":
            continue
        anchor = r.get("anchor")
        anchor_text = (f"{anchor['perplexity']:g} / {_fmt(anchor['compress_seconds'], '.0f')}" if anchor else "")
        load = (f"{r['load_average_before']:.1f} → {r['load_average_after']:.1f}"
                if r.get("load_average_before") is not None else "—")
        cpu = f" ({r['compress_cpu_seconds']:.0f} CPU)" if r.get("compress_cpu_seconds") is not None else ""
        lines.append(f"| {r['method']} | {r['pattern']} | {'yes' if r['permuted'] else 'no'} | {r['sparsity']:.1%} | "
                     f"{r['perplexity']:.2f} | {r['compress_seconds']:.0f}{cpu} | {_fmt(r.get('threads'), 'd')} | "
                     f"{load} | {(r['calibration'] or '—').replace(' tokens of wiki.valid.tokens', '')} | "
                     f"{anchor_text} |")
    goals = []
    for r in payload["rows"]:
        if r.get("anchor") and r.get("anchor", {}).get("compress_seconds") is not None:
            a = r["anchor"]
            ppl_ok, time_ok = r["perplexity"] < a["perplexity"], r["compress_seconds"] < a["compress_seconds"]
            cpu = r.get("compress_cpu_seconds")
            goals.append(f"{r['method']} 2:4 {r['perplexity']:.1f} vs {a['perplexity']:g} "
                         f"({'below' if ppl_ok else 'not below'}), {r['compress_seconds']:.0f} s wall"
                         f"{f' / {cpu:.0f} CPU s' if cpu is not None else ''} at {r['threads']} thread(s), load "
                         f"{r['load_average_before']:.0f}–{r['load_average_after']:.0f}, vs {a['compress_seconds']:.0f} s "
                         f"({'faster' if time_ok else 'not faster'} by wall time), calibration {r['calibration']}")
    if goals:
        lines += ["", "Goals (below llm-compressor's perplexity in less time): " + "; ".join(goals) + "."]
    return "\n".join(lines)


def sparse_matmul_table(payload: dict) -> str:
    rule = payload["sparse_path_rule"]
    return (
        f"Sparse vs dense matmul on this CPU (`benchmarks/sparse_matmul.py` → `benchmarks/results/sparse_matmul.json`, "
        f"{payload['date']}; SmolLM2 projection shapes, 1/16/512 tokens, unstructured 50–95% and 2:4, torch CSR vs "
        f"dense `F.linear`, fp32). {payload['conclusion']['summary']}. 2:4 semi-structured kernels and fp16/bf16 CSR do "
        "not exist on CPU. `SparseLinear` therefore multiplies densely except at one token with density ≤ "
        f"{rule['decode_max_density']} (≤ {rule['decode_max_density_large']} for weights ≥ {rule['large_weight_numel']} "
        f"elements) and at several tokens with density ≤ {rule['many_tokens_max_density']}: at 50% and 2:4 the saving is "
        "storage, not speed."
    )


def runtime_before_after_text(payload: dict) -> str:
    rows = payload["rows"].values()

    def span(measure, key):
        values = [r[measure][key] for r in rows if r[measure][key] is not None]
        return min(values), max(values)

    inside = all(abs(r[m]["after_over_before"] - 1) <= r[m]["round_to_round_noise"]
                 for r in rows for m in ("decode_tok_s", "prefill_tok_s"))
    (d0, d1), (p0, p1) = span("decode_tok_s", "after_over_before"), span("prefill_tok_s", "after_over_before")
    n = [v for m in ("decode_tok_s", "prefill_tok_s") for v in span(m, "round_to_round_noise")]
    proto = payload["protocol"]
    return (f"The runtime before and after issue 12's refactor ({payload['date']}; `benchmarks/runtime_before_after.py` → "
            f"`benchmarks/results/runtime_before_after.json`; {payload['before'][:7]} vs {payload['after'][:7]}, "
            f"one fresh process per commit per round, {proto['rounds']} rounds alternating which goes first, "
            f"{proto['repeats_per_process']} timings each): after/before {d0:.2f}–{d1:.2f} for decode and "
            f"{p0:.2f}–{p1:.2f} for prefill over the {len(payload['rows'])} rows of the table above; "
            + ("every ratio is inside its row's round-to-round noise" if inside else "NOT every ratio is inside its row's noise")
            + f", which was {100 * min(n):.0f}–{100 * max(n):.0f}% on this 2-core machine that day, so the check "
              "excludes only larger regressions.")


def export_compressed_tensors_table(payload: dict) -> str:
    proto = payload["protocol"]
    lines = [
        f"Export of SmolLM2-135M to other runtimes ({payload['date']}; `benchmarks/export_compressed_tensors.py` → "
        f"`benchmarks/results/export_compressed_tensors.json`): WikiText-2 test perplexity on the same "
        f"first N × 512-token windows for every number of a recipe (N in the table), computed by slimformer on the compressed model and by "
        f"transformers {payload['versions']['transformers']} loading each export (compressed-tensors "
        f"{payload['versions']['compressed_tensors']} for that format; `hf`: the dequantised model, no activation "
        f"quantisation). Calibration: {proto['calibration']}. Read back: our reader on the compressed-tensors "
        f"directory, logits against the compressed model on the first windows. Size: all files of the output directory. "
        "W8A8 in transformers: the package's reference quantises each token's activations by absmax/127.5, slimformer "
        "(and vLLM's int8 kernels) by absmax/127; the weights are the same integers."
        + (f" Note: {proto['note']}." if proto.get("note") else ""),
        "",
        "| recipe | N | format | slimformer ppl | transformers ppl | ratio | read back by slimformer: max logit diff | export s | MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        n = row.get("wikitext2_windows", proto["wikitext2_windows"])
        ours = row["slimformer_perplexity"]
        comp = row["formats"]["compressed"]
        lines.append(f"| {row['recipe']} | {n} | compressed (ours) | {ours:.2f} | — | — | — | — | {comp['dir_bytes'] / 1e6:.1f} |")
        for fmt in ("compressed-tensors", "hf"):
            e = row["formats"][fmt]
            lines.append(f"| {row['recipe']} | {n} | {fmt} | {ours:.2f} | {e['transformers_perplexity']:.2f} | "
                         f"{e['ratio_to_slimformer']:.4f} | {_fmt(e.get('slimformer_import_max_logit_diff'), '.1e')} | "
                         f"{e['export_seconds']:.1f} | {e['dir_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def gguf_export_table(payload: dict) -> str:
    proto, versions = payload["protocol"], payload["versions"]
    rows = payload["rows"]
    lines = [
        f"GGUF export read by llama.cpp (`benchmarks/gguf_export.py` → `benchmarks/results/gguf_export.json`; "
        f"llama-cpp-python {versions['llama-cpp-python']}: {versions['llama-cpp-python build']}). Model: "
        f"{payload['model']}. {proto['data']}. (a) the same model in slimformer and in llama.cpp, on "
        f"{proto['agreement_windows']} windows (paired, same tokens): llama.cpp multiplies Q4/Q8 blocks with "
        "activations rounded to 8 bits, slimformer with fp32 activations.",
        "",
        "| file | slimformer ppl | llama.cpp ppl | difference |",
        "|---|---|---|---|",
    ]
    for r in rows:
        a = r.get("agreement")
        if a:
            lines.append(f"| {r['name']} ({r['gguf'] if 'gguf' in r else ''}) | {a['slimformer_perplexity']:.3f} | "
                         f"{a['llama_cpp_perplexity']:.3f} | {100 * a['relative_difference']:+.3f}% |")
    lines += ["", f"(b) llama.cpp's own quantiser (`llama_model_quantize` from our F16 export) against our GPTQ "
              f"exported to the same block types, llama.cpp perplexity on {proto['windows']} windows; calibration: "
              f"{proto['calibration']}; export seconds on a shared machine.", "",
              "| file | how it was made | llama.cpp ppl | bytes | export s |", "|---|---|---|---|---|"]
    for r in rows:
        if "b" in r["part"]:
            lines.append(f"| {r['name']} | {r.get('model', '')} | {r['llama_cpp_perplexity']:.3f} | "
                         f"{r['file_bytes']:,} | {_fmt(r.get('export_seconds'), '.1f')} |")
    for name, gap in payload.get("gap_closed", {}).items():
        lines.append("")
        meaningful = gap["llama.cpp_gap_to_f16"] > 0.01 * gap["f16"]   # else llama.cpp's file is the source grid
        verdict = (f"ours closes {100 * gap['fraction_of_gap_closed']:.1f}% of llama.cpp's gap to F16" if meaningful
                   else "llama.cpp's gap to F16 is the float16 rounding of the source grid: no gap to close (notes)")
        lines.append(f"{name}: F16 {gap['f16']:.3f}, llama.cpp {gap['llama.cpp']:.3f}, ours {gap['ours']:.3f} "
                     f"(bytes {gap['bytes']['llama.cpp']:,} / {gap['bytes']['ours']:,}): {verdict}.")
    lines += ["", "Notes: " + " ".join(payload.get("notes", []))]
    return "\n".join(lines)


def embedding_head_table(payload: dict) -> str:
    proto = payload["protocol"]
    smol = payload.get("smollm2", [])
    lines = [
        f"The embedding / LM head as a recipe stage (`QuantizeEmbeddings`, {payload['date']}; "
        "`benchmarks/embedding_head.py` → `benchmarks/results/embedding_head.json`). SmolLM2-135M, whose "
        f"tied 49152 × 576 table is the embedding and the LM head: WikiText-2 test, {proto['wikitext2_windows']} × "
        f"{proto['seqlen']} tokens; KL and top-1 agreement against fp32 on {proto['agreement_windows']} windows; "
        "stored MB: `model.safetensors`. Table: fp32 (`--set QuantizeEmbeddings.enabled=false`), int8 with one "
        "fp16 scale per row (the built-in recipes' default) or per 32 columns (GGUF Q8_0 blocks). Native vs HF: "
        "max |Δ logit| of the native decoder (32 decode steps) against the model's own forward."
        + (f" {payload['notes']}" if payload.get("notes") else ""),
        "",
        "| body | table | WikiText-2 ppl | Δ vs table fp32 | KL | top-1 | stored MB | table MB | native vs HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    off = {r["body"]: r for r in smol if r["table_format"] == "off"}
    for r in smol:
        ppl, base = r.get("wikitext2_perplexity"), off.get(r["body"], {}).get("wikitext2_perplexity")
        delta = "—" if ppl is None or base is None or r["table_format"] == "off" else f"{100 * (ppl / base - 1):+.2f}%"
        table = next(iter((r.get("table") or {}).values()), None)
        table_mb = "—" if table is None else f"{table['bytes_before'] / 1e6:.1f} → {table['bytes_after'] / 1e6:.1f}"
        native = r.get("native_decode_max_abs_logit_diff")
        lines.append(
            f"| {r['body']} | {r['table_format']} | {_fmt(ppl, '.3f')} | {delta} | {_fmt(r.get('kl'), '.4f')} | "
            f"{_percent(r.get('top1_agreement'))} | {r['stored_bytes'] / 1e6:.1f} | {table_mb} | "
            f"{'—' if native is None else f'{native:.1e}'} |")
    mini = payload.get("minilm", [])
    if mini:
        lines += ["", "all-MiniLM-L6-v2 (its 30522 × 384 word-embedding table; no LM head): "
                  f"{proto['minilm']}.", "",
                  "| body | table | embedding cosine (mean / min) | STS-B Spearman | stored MB |", "|---|---|---|---|---|"]
        for r in mini:
            cos = r.get("embedding_cosine") or {}
            lines.append(f"| {r['body']} | {r['table_format']} | {_fmt(cos.get('mean'), '.5f')} / "
                         f"{_fmt(cos.get('min'), '.4f')} | {_fmt((r.get('stsb') or {}).get('spearman'), '.4f')} | "
                         f"{r['stored_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def fuzz_readers_table(payload: dict) -> str:
    total, protocol = payload["total"], payload["protocol"]
    lines = [
        f"Reader fuzzing ({payload['date']}; `benchmarks/fuzz_readers.py` → `benchmarks/results/fuzz_readers.json`): "
        f"{total['cases']:,} mutated files"
        + (f" in {len(protocol['runs'])} runs (seeds {', '.join(str(r['seed']) for r in protocol['runs'])})"
           if protocol.get("runs") else f" (seed {protocol['seed']})")
        + f" (1–3 mutations each: bit flips, interesting bytes and integers, truncation, "
        f"extension, and fields aimed at lengths, counts, offsets, shapes and names), each read in a worker process; "
        f"a finding is any exception other than our one-line errors, a crash, a hang, or a Python memory peak above "
        f"{protocol['memory_bound']}. Findings: **{total['findings']}** (crashes: {total['crashes']}).",
        "",
        "| reader | cases | read | refused (one line) | findings | largest input B | max traced peak B | peak / input "
        "| max RSS high-water growth B | mean ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in payload["targets"].items():
        lines.append(f"| {name} | {r['cases']:,} | {r['ok']:,} | {r['refused']:,} | {r['findings']} | "
                     f"{r['max_input_bytes']:,} | {r['max_peak_bytes']:,} | {r['max_peak_over_input']:.1f} | "
                     f"{r.get('max_rss_growth_bytes', 0):,} | {1000 * r['mean_seconds']:.1f} |")
    if payload.get("notes"):
        lines += ["", " ".join(payload["notes"])]
    return "\n".join(lines)


def students_table(payload: dict) -> str:
    rows = {r["name"]: r for r in payload["rows"]}
    lines = ["Smaller students by layer dropping, distilled (`benchmarks/students.py` → "
             "`benchmarks/results/students.json`). Training text: WikiText-2 validation (or text sampled from the "
             "teacher, `data=teacher:N`); shared 2-core CPU, budgets per row.", ""]
    decoders = [r for r in rows.values() if r.get("model") == "smollm2-135m"]
    dropped = rows.get("smollm2-half-dropped", {}).get("perplexity")   # measured by --part decoder-before
    speed_row = rows.get("smollm2-half-decode-speed")   # --part decode-speed (shapes only)
    if decoders:
        lines += ["| SmolLM2-135M student | blocks | loss | data | steps × batch × seq_len (s) | perplexity before "
                  "→ after (teacher) | decode tok/s student / teacher (×) | training memory MB (teacher-only) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in decoders:
            b, d, m = r.get("budget", {}), r.get("decode") or speed_row, r.get("memory_bytes") or {}
            loss = " + ".join(f"{t['term']}" for t in r.get("loss_terms", []))
            speed = (f"{d['student_tok_s']:.1f} / {d['teacher_tok_s']:.1f} ({d['speedup']:.2f}×)" if d else "—")
            mem = (f"{m['total'] / 1e6:.0f} ({m['teacher_only'] / 1e6:.0f})" if m else "—")
            lines.append(f"| {r['name']} | {r.get('student_blocks', '—')}/{r.get('teacher_blocks', '—')} | {loss} | "
                         f"{(r.get('data') or {}).get('source') or Path((r.get('data') or {}).get('name', '—')).name} | {b.get('steps', '—')} × {b.get('batch_size', '—')}"
                         f" × {b.get('seq_len', '—')} ({_fmt(b.get('train_seconds'), '.0f')}) | "
                         f"{_fmt(r.get('perplexity_before', dropped), '.1f')} → {_fmt(r.get('perplexity_after'), '.1f')} "
                         f"({_fmt(r.get('teacher_perplexity'), '.2f')}) | {speed} | {mem} |")
        if speed_row and not any(r.get("decode") for r in decoders):
            lines += ["", f"Decode speed from `--part decode-speed` ({speed_row['new_tokens']} new tokens, "
                          f"{speed_row['repeats']} round-robin repeats, {speed_row['threads']} thread): "
                          f"{speed_row['note']}."]
        if r.get("status"):
            lines += ["", f"{r['name']}: {r['status']}"]
        lines.append("")
    if not decoders and (dropped or speed_row):
        speed = (f"decode {speed_row['student_tok_s']:.2f} vs {speed_row['teacher_tok_s']:.2f} tok/s "
                 f"({speed_row['speedup']:.2f}×; {speed_row['note']})" if speed_row else "")
        lines += [f"SmolLM2-135M with every other block (15 of 30), not yet distilled: WikiText-2 test perplexity "
                  f"{_fmt(dropped, '.0f')}; {speed}.", ""]
    encoders = [r for r in rows.values() if r.get("model") == "minilm-l6"]
    if encoders:
        lines += ["| MiniLM-L6 student | kept blocks | steps × batch × seq_len (s) | STS-B Spearman before → after "
                  "(teacher) | of teacher | encode sentences/s student / teacher (×) | goal ≥ 97% at ≥ 1.8× |",
                  "|---|---|---|---|---|---|---|"]
        for r in encoders:
            b, t = r.get("budget", {}), r.get("throughput")
            speed = (f"{t['student']['median']:.0f} / {t['teacher']['median']:.0f} ({t['ratio']:.2f}×)" if t else "—")
            met = "—" if "goal" not in r else ("met" if r["goal"]["met"] else "not met")
            lines.append(f"| {r['name']} | {r.get('layer_map', r.get('keep'))} | {b.get('steps', '—')} × "
                         f"{b.get('batch_size', '—')} × {b.get('seq_len', '—')} ({_fmt(b.get('train_seconds'), '.0f')}) | "
                         f"{_fmt(r.get('spearman_before'), '.4f')} → {_fmt(r.get('spearman_after'), '.4f')} "
                         f"({_fmt(r.get('teacher_spearman'), '.4f')}) | {_percent(r.get('spearman_ratio'))} | "
                         f"{speed} | {met} |")
        for r in encoders:
            if r.get("status"):
                lines += ["", f"{r['name']}: {r['status']}"]
    return "\n".join(lines).rstrip()


def qat_table(payload: dict) -> str:
    rows = {r["name"]: r for r in payload["rows"]}
    first = next(iter(rows.values()))
    lines = [
        "QAT on SmolLM2-135M (`benchmarks/qat.py` → `benchmarks/results/qat_smollm2.json`): WikiText-2 test perplexity, "
        f"{first['windows']} × 512 tokens; {first['embedding']}; {first['threads']} torch thread(s) on the shared 2-core "
        "machine. Training on wiki.valid.tokens (never the test split); the budget per row as stated. "
        "R = (ppl_PTQ − ppl_QAT) / (ppl_PTQ − ppl_fp32): the fraction of the PTQ loss recovered.",
        "",
        "| row | start | loss | steps × batch × seq | train (compress) s | perplexity | R vs RTN | R vs GPTQ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for suffix in sorted({n[len("fp32"):] for n in rows if n.startswith("fp32")} or {""}):
        fp, rtn, gptq = (rows.get(k + suffix, {}).get("perplexity") for k in ("fp32", "rtn", "gptq"))

        def recovered(ptq, ppl):
            return None if None in (ptq, ppl, fp) or ptq == fp else (ptq - ppl) / (ptq - fp)

        for key in ("fp32", "rtn", "gptq", "qat", "qat-distill", "gptq-qat-distill"):
            r = rows.get(key + suffix)
            if r is None:
                continue
            t = r.get("train")
            budget = f"{t['steps']} × {t['batch_size']} × {t['seq_len']}" if t else ""
            seconds = f"{t['wall_seconds']:.0f}" if t else (f"({r['compress_seconds']:.0f})" if r.get("compress_seconds") else "")
            lines.append(f"| {r['name']} | {r.get('init', '')} | {r.get('loss', '')} | {budget} | {seconds} | "
                         f"{r['perplexity']:.2f} | {_fmt(recovered(rtn, r['perplexity']) if key not in ('fp32', 'rtn') else None, '.2f')} | "
                         f"{_fmt(recovered(gptq, r['perplexity']) if t else None, '.2f')} |")
    exact = [r for r in rows.values() if r.get("exactness")]
    for r in exact:
        e = r["exactness"]
        lines += ["", f"Exactness ({r['name']}): fake-quant model vs the deployed QuantLinear model on "
                  f"{e['kernel']['positions']} positions — int4 kernels: max |Δlogit| {e['kernel']['max_abs_logit_diff']:.2e}, "
                  f"argmax agreement {e['kernel']['argmax_agreement']:.2%}; forward_reference: max |Δlogit| "
                  f"{e['reference']['max_abs_logit_diff']:.2e}, argmax agreement {e['reference']['argmax_agreement']:.2%}."]
    if payload.get("notes"):
        lines += ["", payload["notes"]]
    return "\n".join(lines)


TABLES = {"rtn_smollm2.json": rtn_table, "study_w8a8.json": study_table, "lmeval_crosscheck.json": lmeval_table,
          "kernels.json": kernels_table, "runtime.json": runtime_table,
          "runtime_before_after.json": runtime_before_after_text,
          "padfree.json": padfree_table, "offload.json": offload_table, "tensor_parallel.json": tensor_parallel_table,
          "ptq_smollm2.json": ptq_smollm2_table, "ptq_minilm.json": ptq_minilm_table, "zeroquant.json": zeroquant_table,
          "sparsity_smollm2.json": sparsity_table,
          "oneshot_pruning_smollm2.json": oneshot_pruning_table, "sparse_matmul.json": sparse_matmul_table,
          "export_compressed_tensors.json": export_compressed_tensors_table,
          "embedding_head.json": embedding_head_table, "gguf_export.json": gguf_export_table,
          "fuzz_readers.json": fuzz_readers_table, "students.json": students_table, "qat_smollm2.json": qat_table}


def render() -> str:
    parts = []
    for name, fn in TABLES.items():
        path = ROOT / "benchmarks" / "results" / name
        if path.exists():
            parts.append(fn(json.loads(path.read_text())))
    return "\n\n".join(parts) if parts else "_No benchmark results yet._"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + render() + "\n" + text[end:])
    print("README table updated")


if __name__ == "__main__":
    main()
