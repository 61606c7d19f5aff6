"""Before any job: every alive node of the Ray cluster sees the output folder and the caches at
the driver's paths, and runs the driver's code."""
from __future__ import annotations

import uuid
from pathlib import Path

from config import ConfigError
from utils.engine.features import feature_cache_dir
from utils.files import atomic_write_text


def _node_view(probe: str, token: str, folders: list[str]) -> tuple[str, bool, list[str], str]:
    """Run on one node: its address, whether it reads the driver's probe file, the folders it
    does not see, and the fingerprint of the code it imports."""
    import ray

    from utils.env import PROJECT_ROOT, code_fingerprint

    sees_output = Path(probe).is_file() and Path(probe).read_text() == token
    return (ray.util.get_node_ip_address(), sees_output, [f for f in folders if not Path(f).is_dir()],
            code_fingerprint(PROJECT_ROOT))


def shared_folders(cfg) -> list[str]:
    """Folders every node must see: the image cache, and a frozen encoder's feature cache."""
    folders = [cfg.resolved_cache_dir()]
    if cfg.freeze_backbone:
        folders.append(feature_cache_dir(cfg))
    return [str(f) for f in folders]


def check_nodes(ray, cfg, code: str) -> None:
    """One probe per alive node; a node that is blind to a folder or runs other code is refused
    in one line."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe, token = Path(cfg.output_dir) / ".ray_probe", uuid.uuid4().hex
    atomic_write_text(probe, token)
    view = ray.remote(num_cpus=0)(_node_view)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    folders = shared_folders(cfg)
    try:
        answers = ray.get([view.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                           .remote(str(probe), token, folders) for n in nodes])
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted({ip for ip, sees, missing, _ in answers if not sees or missing})
    if blind:
        raise ConfigError(f"[CFG011] executor: node(s) {', '.join(blind)} do not see {cfg.output_dir} and "
                          f"{' and '.join(folders)}: put --output-dir (and --cache-dir) on storage every pod mounts "
                          f"at the same path (the RunPod network volume at /workspace)")
    other = sorted({f"{ip} ({fingerprint})" for ip, _, _, fingerprint in answers if fingerprint != code})
    if other:
        raise ConfigError(f"[CFG012] executor: node(s) {', '.join(other)} run other code than the driver ({code}): "
                          f"Ray ships the driver's folder to every node; check that nothing on the node's "
                          f"PYTHONPATH shadows it")
