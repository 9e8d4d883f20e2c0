"""The demo's quantized release: the best merge exported to GGUF as q8_0 and q4_0, read back and compared with the
source, tensor by tensor."""

from __future__ import annotations

from .sections import MergedDemo, Section

GGUF_TYPES = ("q8_0", "q4_0")


def gguf_section(run: MergedDemo) -> Section:
    from ..export.gguf import export_gguf, quantization_error

    best = run.best
    section = Section(f"Quantized release (GGUF) of the best merge ({best})", "gguf")
    folder = run.results[best].out / "candidate"
    run.console.print(f"[bold]gguf[/]: {best} → {', '.join(GGUF_TYPES)}")
    source_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows = []
    for qtype in GGUF_TYPES:
        written = export_gguf(folder, run.out / "gguf" / f"merged-{best}-{qtype}.gguf", qtype, overwrite=True)
        worst = quantization_error(written, folder)
        rows.append([qtype, f"{written.path.stat().st_size / 1e6:.2f} MB",
                     f"{worst.ratio:.3f} ({worst.tensor})", f"{worst.relative:.2%}"])
    section.blocks += [
        f"The best merge ({best}, candidate/ with {source_bytes / 1e6:.2f} MB of safetensors) exported with "
        "`mergegate export-gguf` to gguf/, read back with the `gguf` package's reader and dequantizers, and "
        "compared with the source tensor by tensor (the bound: per 32-value block with largest magnitude m, "
        "q8_0 d/2 with d = m/127, q4_0 d with d = m/8, plus d's float16 rounding).",
        (["type", "file", "largest error / the format's bound (tensor)", "largest error / the matrix's largest magnitude"],
         rows),
        "llama.cpp (llama-cpp-python) is not installed here, so the GGUF files are not served or evaluated per "
        "cohort: what quantization costs each cohort is not measured.",
    ]
    return section
