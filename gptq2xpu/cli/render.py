"""Human renderings of plans and results (the JSON forms are the dicts themselves)."""

from __future__ import annotations

from rich.table import Table

from ..contract import MANIFEST_NAME
from .output import human_bytes

_ACTION_STYLE = {"convert": "green", "passthrough": "cyan", "refuse": "red"}


def render_plan(console, data: dict) -> None:
    q = data["quantization"]
    console.print(f"[bold]{data['source']}[/]  family [bold]{data['family']}[/]  "
                  f"{q['quant_method']} {q['bits']}-bit group {q['group_size']} ({q['checkpoint_format']}, "
                  f"from {q['found_in']})")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("MoE layer", "action", "kind", "E", "K", "N", "group in->out", "scales"):
        table.add_column(col, no_wrap=True)
    table.add_column("reason / notes", overflow="fold", min_width=20)
    for layer in data["layers"]:
        groups = ""
        if "source_group_size" in layer:
            src = layer["source_group_size"]
            if len(set(src.values())) > 1:
                src_txt = "/".join(str(src[r]) for r in ("gate", "up", "down"))
            else:
                src_txt = str(next(iter(src.values())))
            if "w13_group_size" in layer:
                src_txt += f" -> {layer['w13_group_size']}/{layer['w2_group_size']}"
            groups = src_txt
        scales = layer.get("scale_dtype", "") or ""
        why = layer["reason"] + ("; " + "; ".join(layer["notes"]) if layer.get("notes") else "")
        style = _ACTION_STYLE.get(layer["action"], "")
        table.add_row(layer["prefix"], f"[{style}]{layer['action']}[/]", layer["kind"], str(layer.get("experts", "")),
                      str(layer.get("hidden_size", "")), str(layer.get("intermediate_size", "")), groups, scales, why)
    console.print(table)
    routers = data.get("routers_excluded", [])
    console.print(f"routers kept out of the expert path: {len(routers)}"
                  + (f" ({routers[0]} ...)" if routers else ""))
    console.print(f"layers: {data['converted_layers']} converted, {data['passthrough_layers']} passed through, "
                  f"{data['refused_layers']} refused; other tensors passed through: {data['passthrough_tensors']}")
    console.print(f"bytes in {human_bytes(data['bytes_in'])}, out {human_bytes(data['bytes_out'])} "
                  f"in {len(data['shards'])} shard(s)")
    if data.get("tp"):
        console.print("tensor parallel: " + ", ".join(
            f"T={t['tp_size']} {t['how']}" + (f" (+{human_bytes(t['extra_bytes'])})" if t["extra_bytes"] else "")
            for t in data["tp"]))
    if data.get("output_format"):
        console.print(f"output format [bold]{data['output_format']}[/]: served by {data['serves']}")
        others = [f"{name}: {where}" for name, where in data.get("formats", {}).items()
                  if name != data["output_format"]]
        if others:
            console.print("other formats (--format): " + "; ".join(others))
        if data.get("output_format") == "compressed-tensors":
            console.print(f"compressed-tensors: {data.get('linears', 0)} linear(s) outside the MoE layers also "
                          f"written pack-quantized; ignored (float) linears: {len(data.get('ignore', []))}")
    for r in data.get("refusals", []):
        console.print(f"[red]refused:[/] {r}")


def render_inspect(console, data: dict) -> None:
    render_plan(console, data)
    console.print(f"source fingerprint {data['source_fingerprint']}")
    hub = data.get("hub")
    if not hub:
        return
    at = f"{hub['repo_id']}" + (f" at commit {hub['commit'][:12]}" if hub.get("commit") else "")
    fetched = f"{hub['requests']} request(s), {human_bytes(hub['bytes_fetched'])} fetched"
    if hub["read_from"] == "cache":
        console.print(f"read {at} from the local Hugging Face cache ({hub['reason']}); "
                      + (f"{fetched} to resolve the revision" if hub["requests"] else "nothing fetched"))
        return
    data_note = ("no tensor data" if not hub["tensor_bytes_fetched"] else
                 f"{human_bytes(hub['tensor_bytes_fetched'])} of tensor data, because the server ignored Range")
    console.print(f"read {at} from {hub['endpoint']} over HTTP: {fetched} (configs, index, safetensors headers; "
                  f"{data_note}) of {human_bytes(data['bytes_in'])} in the shards")


def render_convert(console, data: dict) -> None:
    if data.get("dry_run"):
        render_plan(console, data)
        console.print("[bold]dry run[/]: nothing written")
        return
    where = data["output"] + (f" (part {data['part']})" if data.get("part") else "")
    console.print(f"[green]converted[/] {data['converted_layers']} MoE layer(s) of {data['source']} -> {where}")
    files = f"{data['files']} files" + ("" if data.get("part") else f" and {MANIFEST_NAME}, which lists them")
    console.print(f"{files}; {human_bytes(data['bytes_written'])} written in {data['seconds']} s "
                  f"with {data['jobs']} job(s); {data['passthrough_layers']} MoE layer(s) passed through, "
                  f"{data['passthrough_tensors']} other tensors byte-identical")
    if data.get("part"):
        console.print(f"next: {finalize_step(data['output'])}")


def finalize_step(output) -> str:
    """What a part run leaves to do: the output is no checkpoint until ``finalize`` ran."""
    return f"once every part has finished, run `gptq2xpu finalize {output}`"
