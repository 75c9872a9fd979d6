"""``stepmesh info``: versions, the UCX transports and devices found, the backend.

Every probe is guarded: a missing package or a machine without a GPU shows up
as a value in the report, never as a failure of the command.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import sys
from typing import Any

__all__ = ["collect", "format_text", "format_json", "parse_ucx_context_info"]

# "#      resource 1  :  md 1  dev 1  flags -- tcp/eth0"
_RESOURCE = re.compile(r"resource\s+\d+\s*:\s*md\s+\d+\s+dev\s+\d+\s+flags\s+\S+\s+([^/\s]+)/(\S+)")
# "#     component 1  :  tcp"
_COMPONENT = re.compile(r"component\s+\d+\s*:\s*(\S+)")


def parse_ucx_context_info(text: str) -> dict[str, Any]:
    """Parse what ``ucp_context_print_info`` writes (``UCXContext.info``).

    Returns:
        ``{"components": [...], "resources": [{"transport", "device"}, ...],
        "transports": [...]}``; transports are unique, in the order UCX lists them.
    """
    components: list[str] = []
    resources: list[dict[str, str]] = []
    transports: list[str] = []
    for line in text.splitlines():
        m = _RESOURCE.search(line)
        if m:
            tl, dev = m.group(1), m.group(2)
            resources.append({"transport": tl, "device": dev})
            if tl not in transports:
                transports.append(tl)
            continue
        m = _COMPONENT.search(line)
        if m and m.group(1) not in components:
            components.append(m.group(1))
    return {"components": components, "resources": resources, "transports": transports}


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _versions() -> dict[str, str | None]:
    from stepmesh._version import __version__

    out: dict[str, str | None] = {
        "stepmesh": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
    }
    try:
        import torch

        out["torch"] = str(torch.__version__)
    except Exception as e:
        out["torch"] = f"not available ({_error(e)})"
    try:
        import numpy

        out["numpy"] = str(numpy.__version__)
    except Exception as e:
        out["numpy"] = f"not available ({_error(e)})"
    out["ucxx"] = _dist_version("ucxx-cu12", "ucxx-cu13", "ucxx", "ucxx-cu11") or "not installed"
    try:
        from stepmesh.control.transport import ucx_version

        out["ucx"] = ucx_version()
    except Exception as e:
        out["ucx"] = f"not available ({_error(e)})"
    try:
        from stepmesh.control.transport import bound_core, ucp_library_path

        core = bound_core()
        out["libucp"] = f"{ucp_library_path()} (bound at run time by the compiled core)"
        out["core"] = f"{core.__file__} ({len(core.constants())} wire constants, checked)"
    except Exception as e:
        out["libucp"] = f"not available ({_error(e)})"
        out["core"] = f"not available ({_error(e)})"
    return out


def _ucx() -> dict[str, Any]:
    try:
        from stepmesh.control.transport import Transport

        transport = Transport({}, "blocking")
        try:
            info = parse_ucx_context_info(str(transport.context.info))
            info["cuda_support"] = bool(getattr(transport.context, "cuda_support", False))
        finally:
            transport.close()
        info["error"] = None
        return info
    except Exception as e:
        return {"components": [], "resources": [], "transports": [], "cuda_support": False, "error": _error(e)}


def _devices() -> dict[str, Any]:
    out: dict[str, Any] = {"cuda_available": False, "count": 0, "names": [], "error": None}
    try:
        import torch

        out["cuda_available"] = bool(torch.cuda.is_available())
        if out["cuda_available"]:
            out["count"] = int(torch.cuda.device_count())
            out["names"] = [str(torch.cuda.get_device_name(i)) for i in range(out["count"])]
        out["torch_cuda"] = getattr(torch.version, "cuda", None)
    except Exception as e:
        out["error"] = _error(e)
    return out


def _config() -> dict[str, Any]:
    try:
        from stepmesh.config import Config

        cfg = Config.from_env()
    except Exception as e:
        return {"error": _error(e)}
    return {
        "error": None,
        "backend": cfg.backend,
        "progress": cfg.progress,
        "transports": list(cfg.transports) if cfg.transports is not None else None,
        "enable_rdma": cfg.enable_rdma,
        "topology": cfg.topology,
        "ucx_options": cfg.ucx_options(),
    }


def collect() -> dict[str, Any]:
    """Everything ``stepmesh info`` reports, as plain JSON-able data."""
    devices = _devices()
    config = _config()
    if config.get("backend"):
        backend = {"name": config["backend"], "reason": "set by STEPMESH_BACKEND"}
    elif devices["cuda_available"]:
        backend = {"name": "cuda", "reason": "auto: a CUDA device is available"}
    else:
        backend = {"name": "cpu", "reason": "auto: no CUDA device"}
    ucx = _ucx()
    found = set(ucx.get("transports") or [])
    try:
        from stepmesh import backends

        registered = {
            name: {"available": ok, "reason": why, "device_transports": sorted(found & set(backends.get(name).ucx_transports))}
            for name, (ok, why) in backends.available().items()
        }
    except Exception as e:
        registered = {"error": _error(e)}
    return {
        "versions": _versions(),
        "ucx": ucx,
        "devices": devices,
        "backend": backend,
        "backends": registered,
        "config": config,
    }


def format_json(report: dict[str, Any]) -> str:
    """The report as indented JSON."""
    return json.dumps(report, indent=2, sort_keys=False)


def format_text(report: dict[str, Any]) -> str:
    """The report as a human-readable table."""
    lines: list[str] = ["versions"]
    versions = report["versions"]
    width = max(len(k) for k in versions) + 2
    for name, value in versions.items():
        label = "UCX" if name == "ucx" else name
        lines.append(f"  {label:<{width}}{value}")

    ucx = report["ucx"]
    lines.append("")
    if ucx.get("error"):
        lines.append(f"UCX transports: unavailable ({ucx['error']})")
    else:
        lines.append(f"UCX transports: {', '.join(ucx['transports']) or 'none found'}")
        by_tl: dict[str, list[str]] = {}
        for r in ucx["resources"]:
            by_tl.setdefault(r["transport"], []).append(r["device"])
        tl_width = max((len(t) for t in by_tl), default=0) + 2
        for tl, devs in by_tl.items():
            lines.append(f"  {tl:<{tl_width}}{', '.join(devs)}")
        lines.append(f"  (UCX built with CUDA support: {'yes' if ucx.get('cuda_support') else 'no'})")

    dev = report["devices"]
    lines.append("")
    if dev.get("error"):
        lines.append(f"devices: unknown ({dev['error']})")
    elif dev["cuda_available"]:
        lines.append(f"devices: {dev['count']} CUDA device(s)")
        for i, name in enumerate(dev["names"]):
            lines.append(f"  cuda:{i}  {name}")
    else:
        lines.append("devices: no CUDA device (CPU only)")

    cfg = report["config"]
    lines.append("")
    lines.append(f"backend: {report['backend']['name']} ({report['backend']['reason']})")
    for name, b in report.get("backends", {}).items():
        if name == "error":
            lines.append(f"  backends: unknown ({b})")
            continue
        state = "usable" if b["available"] else f"not usable: {b['reason']}"
        tls = ", ".join(b["device_transports"]) or "none"
        lines.append(f"  {name:<6} {state}; UCX transports for its memory here: {tls}")
    if cfg.get("error"):
        lines.append(f"configuration: invalid environment: {cfg['error']}")
    else:
        tls = cfg["ucx_options"].get("TLS") or "every transport UCX found (STEPMESH_TRANSPORTS unset)"
        lines.append(f"progress: {cfg['progress']}")
        lines.append(f"transports used: {tls}")
    return "\n".join(lines)
