"""A memory plan: each actor's peak bytes for a config on a device, checked before Ray starts.

`plan(cfg, device)` reads the two models' shapes (opd/memory_shapes.py: a local folder's config.json,
`assets/shapes/` for the anchors' hub ids, or the Hugging Face cache; no weights are loaded), adds up per actor
what it holds (opd/memory_terms.py: persistent terms held for the whole run, step terms alive only during the
actor's phase, and what each grows with) and sums them per device of the mode's placement against its memory
(opd/memory_device.py: this machine's GPUs or RAM). `check` refuses, with one line, a GPU that cannot hold the run.

Placement: colocated puts the three actors on one GPU and each phase returns its cached memory when it ends
(opd/actors/common.py `return_cached_memory`), so the GPU needs the persistent terms of all three plus the largest
phase; split puts the learner alone on GPU 0 and rollout + teacher on GPU 1, where nothing is returned between
phases, so GPU 1 needs both actors' peaks; the cpu mode's three processes share the machine's RAM (a warning only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opd.config import Config, ConfigError
from opd.memory_device import GIB, Device, detect
from opd.memory_shapes import SHAPES_DIR, model_arch, step_of
from opd.memory_terms import ActorPlan, Term, actor_plans
from opd.modes import uses_gpus


@dataclass(frozen=True)
class DeviceUse:
    name: str  # "GPU 0", "RAM"
    roles: tuple[str, ...]
    need_bytes: int
    have_bytes: int
    returned: bool = True  # phases return their memory: the need is every persistent term plus the largest phase

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.have_bytes


@dataclass(frozen=True)
class MemoryPlan:
    device: Device
    mode: str
    actors: dict[str, ActorPlan] = field(default_factory=dict)
    uses: tuple[DeviceUse, ...] = ()
    not_planned: str = ""  # why there is no plan ("not planned: no shape for ...")
    advice: dict[str, str] = field(default_factory=dict)  # device name -> the one-line refusal

    @property
    def fits(self) -> bool:
        return all(u.fits for u in self.uses)

    @property
    def problems(self) -> list[str]:
        return [self.advice[u.name] for u in self.uses if not u.fits]

    def format(self, verbose: bool = False) -> str:
        """One line per device (and, verbose, one per actor with its terms), sizes in GiB."""
        if self.not_planned:
            return f"memory plan: {self.not_planned}"
        lines = []
        for u in self.uses:
            if u.returned and len(u.roles) > 1:  # held by all + the largest phase, which runs alone
                held = ", ".join(f"{r} {self.actors[r].persistent_bytes / GIB:.1f}" for r in u.roles)
                top = max(u.roles, key=lambda r: self.actors[r].step_bytes)
                parts = f"held ({held}) + largest phase ({top} {self.actors[top].step_bytes / GIB:.1f})"
            else:
                parts = " + ".join(f"{r} {self.actors[r].peak_bytes / GIB:.1f}" for r in u.roles)
            lines.append(f"memory plan ({self.mode}): {u.name} ({self.device.name}, {u.have_bytes / GIB:.1f} GiB) "
                         f"needs {u.need_bytes / GIB:.1f} GiB ({u.need_bytes / u.have_bytes:.0%}): {parts}")
        if verbose:
            for role, a in self.actors.items():
                terms = ", ".join(f"{t.name} {t.bytes / GIB:.2f}" + ("" if t.persistent or t.phase == "step"
                                                                   else f" [{t.phase}]") for t in a.terms if t.bytes)
                lines.append(f"  {role}: peak {a.peak_bytes / GIB:.2f} GiB ({terms})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"device": vars(self.device), "mode": self.mode, "fits": self.fits, "not_planned": self.not_planned,
                "uses": [{**vars(u), "fits": u.fits} for u in self.uses],
                "actors": {r: {"peak_bytes": a.peak_bytes, "persistent_bytes": a.persistent_bytes,
                               "step_bytes": a.step_bytes, "terms": a.breakdown()} for r, a in self.actors.items()}}



def plan(cfg: Config, device: Device, *, prompt_tokens: int | None = None) -> MemoryPlan:
    """Each actor's peak for `cfg` and, per device of the mode's placement, their sum against its memory."""
    mode = cfg.run.mode
    archs = {side: model_arch(getattr(cfg.model, side)) for side in ("student", "teacher")}
    missing = [f"model.{side}={getattr(cfg.model, side)}" for side, a in archs.items() if a is None]
    if missing:
        return MemoryPlan(device, mode, not_planned=f"not planned: no shape for {', '.join(missing)} (no local "
                                                    f"config.json, no {SHAPES_DIR}/ file, not in the HF cache)")
    actors = actor_plans(cfg, archs["student"], archs["teacher"], step_of(cfg, prompt_tokens), device)
    rep = {"rollout": cfg.run.rollout_replicas, "teacher": cfg.run.teacher_replicas,
           "learner": cfg.run.learner_replicas}

    def together(roles: tuple[str, ...], returned: bool, replicas: bool = True) -> int:
        """The need of `roles` sharing one device: every persistent term, plus the largest phase when each phase
        returns its memory (`returned`), else every actor's whole peak."""
        k = {r: rep[r] if replicas else 1 for r in roles}
        persistent = sum(k[r] * actors[r].persistent_bytes for r in roles)
        if returned:
            return persistent + max(actors[r].step_bytes for r in roles)
        return persistent + sum(k[r] * actors[r].step_bytes for r in roles)

    everyone = ("rollout", "teacher", "learner")
    if device.kind != "cuda" or not uses_gpus(cfg):
        uses = (DeviceUse("RAM", everyone, together(everyone, returned=True), device.total_bytes),)
    elif mode == "colocated" and cfg.run.gpus > 1:  # one of each on every GPU: the same need on each
        uses = (DeviceUse(f"each of GPUs 0-{cfg.run.gpus - 1}", everyone,
                          together(everyone, returned=True, replicas=False), device.total_bytes),)
    elif mode == "colocated":
        uses = (DeviceUse("GPU 0", everyone, together(everyone, returned=True), device.total_bytes),)
    else:  # split: the learner alone on GPU 0; rollout replica i and teacher replica i share GPU 1 + i
        uses = (DeviceUse("GPU 0", ("learner",), actors["learner"].peak_bytes, device.total_bytes, False),
                DeviceUse("GPU 1", ("rollout", "teacher"), together(("rollout", "teacher"), False, replicas=False),
                          device.total_bytes, False))
    return MemoryPlan(device, mode, actors, uses, advice={u.name: _advice(cfg, u, actors, device) for u in uses})


def _advice(cfg: Config, use: DeviceUse, actors: dict[str, ActorPlan], device: Device) -> str:
    """One line: the device, the estimate against its memory, the actor to blame and the setting to change. When
    the persistent terms alone do not fit, no token budget helps: the actor holding the most of them is named."""
    peaks = ", ".join(f"{r} {actors[r].peak_bytes / GIB:.1f}" for r in use.roles)
    head = f"memory plan: {{}} does not fit on {use.name} ({device.name}, {use.have_bytes / GIB:.1f} GiB): estimate " \
           f"{use.need_bytes / GIB:.1f} GiB ({peaks}), "
    persistent = sum(actors[r].persistent_bytes for r in use.roles)
    candidates = [(t.bytes, role, t) for role in use.roles for t in actors[role].terms if t.setting]
    if persistent > use.have_bytes or not candidates:
        held = max(((t.bytes, role, t) for role in use.roles for t in actors[role].terms if t.persistent),
                   key=lambda c: c[0])
        if held[2].setting:  # sglang's reservation: a fraction of the GPU
            return head.format(held[1]) + f"its {held[2].name} {held[0] / GIB:.1f} GiB: {_fix(cfg, held[2])}"
        role = max(use.roles, key=lambda r: actors[r].persistent_bytes)
        fix = ("use --mode split (the learner gets a GPU of its own)" if cfg.run.mode == "colocated"
               else "use a device with more memory or a smaller model")
        return head.format(role) + (f"weights, gradients and optimizer state alone {persistent / GIB:.1f} GiB: "
                                    f"{fix}")
    size, role, term = max(candidates, key=lambda c: c[0])
    return head.format(role) + f"its largest part {term.name} {size / GIB:.1f} GiB: {_fix(cfg, term)}"


def _fix(cfg: Config, term: Term) -> str:
    lc, tc = cfg.learner, cfg.teacher
    if term.setting.startswith("learner.micro_batch_tokens"):
        now = f"lower learner.micro_batch_tokens (now {lc.micro_batch_tokens or '0, the whole batch'})"
        return now + ("" if lc.gradient_checkpointing else " or turn on learner.gradient_checkpointing")
    if term.setting == "teacher.micro_batch_tokens":
        return f"lower teacher.micro_batch_tokens (now {tc.micro_batch_tokens or '0, the whole batch'})"
    if term.setting == "rollout.mem_fraction":
        return f"lower rollout.mem_fraction (now {cfg.rollout.mem_fraction})"
    if term.setting.startswith("model."):
        return f"set {term.setting}"
    split = " or use --mode split" if cfg.run.mode == "colocated" else ""
    return f"lower {term.setting}{split}"


def check(cfg: Config, device: Device | None = None, *, prompt_tokens: int | None = None,
          warn_only: bool | None = None) -> MemoryPlan:
    """The plan for `cfg` on `device` (default: this machine's); raises ConfigError with one line when a GPU cannot
    hold it. On the CPU (or `warn_only`) a shortfall is returned, not raised: the caller warns."""
    device = detect(cfg) if device is None else device
    if device is None:
        return MemoryPlan(Device.cpu(0), cfg.run.mode, not_planned="not checked: the GPUs are a Ray cluster's")
    result = plan(cfg, device, prompt_tokens=prompt_tokens)
    warn_only = device.kind != "cuda" if warn_only is None else warn_only
    if result.problems and not warn_only:
        raise ConfigError(result.problems[0])
    return result
