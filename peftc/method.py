"""The public way to write a method: where it applies, its parameters, its rewrite, and optionally its merge.

    @peftc.register_method
    class GatedLoRA(peftc.Method):
        '''gated_lora: y = W x  ==>  y + B(g ⊙ A x)'''
        kind = "gated_lora"                      # spec table [[gated_lora]], pass insert-gated-lora
        r: int = 8

        def params(self, site):                  # names (as saved, after the module path), shapes, init
            return {"lora_A.weight": peftc.Param((self.r, site.in_features), init="kaiming_uniform"),
                    "lora_B.weight": peftc.Param((site.out_features, self.r), init="zeros"),
                    "gate": peftc.Param((self.r,), init="ones")}

        def forward(self, site, x, y, p):        # the rewrite, a plain torch function
            return y + site.apply(x, p["lora_B.weight"] @ (p.gate[:, None] * p["lora_A.weight"]))

        def merge(self, site, w, p):             # optional: W' such that site.apply(x, W') == forward(...)
            return w + p["lora_B.weight"] @ (p.gate[:, None] * p["lora_A.weight"])

A method is a spec rule (a frozen dataclass; its fields are its options, type-checked against their defaults) with
`target`/`exclude` selectors in HF PEFT's `target_modules` forms. `register_method` makes it loadable from spec
files (`[[kind]]`) and registers its pass, `insert-<kind>`, which the default pipeline runs for it. The pass
finds the sites (`sites`: matmuls and/or convolutions, or module, norm or attention outputs), adds the parameters
to the parameter table under `<module>.<name>` (HF PEFT's key layout; `shared_params` are added once, under their
own name), and inserts `forward`, traced on the graph's own nodes: the diff shows it op for op, verification and
prune-grads see it like any other pass's nodes, and ONNX export lowers it. `merge` is traced to ATen once per site at merge time, and
fold-params evaluates it into the base weight, so the merged graph is the plain capture's, op for op.

Optional hooks: `rewrite_weight(site, w, p)` instead of forward (the site computes op(x, W'); merging is folding
W'), `regularizer(sites)` (a term added to the output's loss), `before_call(sites)` (in-place updates before each
call), and `peft_type` (HF PEFT's format both ways).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node, Proxy
from torch.fx.proxy import GraphAppendingTracer

from .errors import PassError, SpecError
from .match import _KEEPS, REWRITTEN, ConvSite, MatmulSite, conv_sites, matmul_sites, select
from .rewrite import NodeBuilder, adapted, mark_adapted
from .spec import Rule, Target, register_rule

aten = torch.ops.aten

# The tag insert-<method> writes on a rewrite's output node; merge_methods reads it.
TAG = "peftc.method"
SITE_KINDS = ("matmul", "conv", "module", "norm", "attention")
WEIGHT_KINDS = ("matmul", "conv")  # sites with a weight: `site.apply` and `merge` exist only there

INITS: dict[str, Callable[[torch.Tensor], Any]] = {
    "zeros": nn.init.zeros_,
    "ones": nn.init.ones_,
    "normal": nn.init.normal_,
    # HF PEFT's init of LoRA's A (and of most of its low-rank factors): nn.Linear's default
    "kaiming_uniform": lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)),
}


@dataclass(frozen=True)
class Param:
    """A parameter a method adds: its shape, its init, and whether it trains.

    `init` is a name in INITS ("zeros", "ones", "normal", "kaiming_uniform"), a number to fill with, or a
    function that fills the (empty) tensor in place or returns the value.
    """

    shape: tuple[int, ...]
    init: str | float | Callable[[torch.Tensor], Any] = "zeros"
    trainable: bool = True

    def make(self, dtype: torch.dtype, device: torch.device, where: str) -> torch.Tensor:
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.shape):
            raise PassError(f"{where}: shape {self.shape!r} must be positive integers")
        t = torch.empty(tuple(self.shape), dtype=dtype, device=device)
        if isinstance(self.init, str):
            if self.init not in INITS:
                raise PassError(f"{where}: unknown init {self.init!r}; use one of {', '.join(INITS)}, a number "
                                f"or a function")
            INITS[self.init](t)
        elif isinstance(self.init, (int, float)) and not isinstance(self.init, bool):
            t.fill_(self.init)
        elif callable(self.init):
            with torch.no_grad():
                value = self.init(t)
            if isinstance(value, torch.Tensor) and value is not t:
                if tuple(value.shape) != tuple(self.shape):
                    raise PassError(f"{where}: init returned shape {tuple(value.shape)}, not {tuple(self.shape)}")
                t.copy_(value)
        else:
            raise PassError(f"{where}: init must be a name, a number or a function, got {type(self.init).__name__}")
        return t


@dataclass(frozen=True)
class Site:
    """Where a method applies, as its functions see it.

    `weight_shape` is W as the method sees it, whatever its storage: (out, in) for a matmul (GPT-2's Conv1D
    included), (out, in/groups, *kernel) for a convolution. `apply(x, w)` is the site's own op with weight `w`
    (that shape) and no bias: `linear(x, w)`, or the convolution with the site's stride, padding, dilation and
    groups. `training` says whether the graph is a training graph (dropout is live only there). Module, norm and
    attention sites have no weight (`weight` is None); `out_features` is the last dim of their output.
    """

    kind: str  # matmul | conv | module | norm | attention
    module: str
    weight: str | None
    weight_shape: tuple[int, ...] | None
    in_features: int | None
    out_features: int
    training: bool
    dtype: torch.dtype  # the adapters' dtype: float32 on half-precision bases
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | str | None = None
    dilation: tuple[int, ...] | None = None
    groups: int = 1
    module_type: str = ""  # the module's class name (module and norm sites)
    heads: int = 0  # attention sites: query heads, key/value heads, head dim
    kv_heads: int = 0
    head_dim: int = 0

    def apply(self, x, w):
        if self.kind not in WEIGHT_KINDS:
            raise PassError(f"`{self.module}` is a {self.kind} site, which has no weight: site.apply is for matmul "
                            f"and conv sites")
        if self.kind == "matmul":
            return F.linear(x, w)
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.weight_shape) - 3]
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return conv(x, w, None, list(self.stride), padding, list(self.dilation), self.groups)


class Tensors(dict):
    """A method's tensors by name: `p["lora_A.weight"]`, or `p.gate` for names that are identifiers."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no tensor `{name}`; this method's tensors: {', '.join(self)}") from None


@dataclass(frozen=True)
class Method(Rule):
    """Base of a method written with the public API (peftc/method.py; docs/methods.md, "Writing a method").

    Subclasses set `kind` and, optionally, `sites` ("matmul" and/or "conv"; or one of "module", "norm",
    "attention"), declare options as fields, and define `params(site)`, `forward(site, x, y, p)` and optionally
    `merge(site, w, p)` (weight sites only) and `shared_params(sites)`.
    """

    kind: ClassVar[str] = ""
    sites: ClassVar[tuple[str, ...]] = ("matmul",)
    # HF PEFT's peft_type ("OFT"), for a method whose options (through hf_names) and tensor names are HF's: then
    # save_pretrained writes HF PEFT's format and Spec.from_peft / load_adapter read it (peftc/peft_format.py).
    peft_type: ClassVar[str | None] = None
    # PEFT config keys the method has no option for, and the one value it reads (None: HF ignores the key)
    peft_defaults: ClassVar[dict[str, Any]] = {}

    # None: every matmul but the output layer ("all-linear"), every norm, every attention (module sites: required)
    target: Target = None
    exclude: Target = None

    def __post_init__(self) -> None:
        where = self._where()
        self._check_targets(where)
        if self.target == "all-linear" and self.sites[0] not in WEIGHT_KINDS:
            raise SpecError(f"{where}: `target` = 'all-linear' selects matmuls, and this method rewrites "
                            f"{self.sites[0]} outputs; give module paths (a regex or a list)"
                            + ("" if self.sites[0] == "module" else ", or leave `target` unset for all of them"))
        if self.target is None and self.sites[0] == "module":
            raise SpecError(f"{where}: `target` is required: the modules whose output to rewrite, e.g. "
                            f"target=r'layers\\.\\d+\\.mlp'")
        for f in dataclasses.fields(self):
            if f.name in ("target", "exclude") or f.default is dataclasses.MISSING or f.default is None:
                continue
            value, default = getattr(self, f.name), f.default
            kind = bool if isinstance(default, bool) else (int, float) if isinstance(default, float) \
                else type(default)
            if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
                raise SpecError(f"{where}: `{f.name}` must be a {type(default).__name__} like its default "
                                f"{default!r}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Check option values; raise peftc.SpecError saying what is wrong and the fix."""

    def params(self, site: Site) -> dict[str, Param]:
        raise NotImplementedError(f"{type(self).__name__}.params(site) must return {{name: peftc.Param}}")

    def shared_params(self, sites: list[Site]) -> dict[str, Param]:
        """Parameters shared by every site (VeRA's random projections), named as they are, added once."""
        return {}

    def forward(self, site: Site, x, y, p: Tensors):
        raise NotImplementedError(f"{type(self).__name__}.forward(site, x, y, p) must return the new output")

    merge: ClassVar[Callable | None] = None  # def merge(self, site, w, p) -> W', same shape as w
    # Instead of forward (weight sites): def rewrite_weight(self, site, w, p) -> W'; the site then computes
    # op(x, W'), and a merge is fold-params evaluating W' (OFT's rotated weight, BOFT's butterfly).
    rewrite_weight: ClassVar[Callable | None] = None
    # How several active adapters' weight rewrites nest, as HF PEFT's layer applies them (insert-adapters):
    # "active" rewrites the first adapter's W' by the next, W' = rw_n(···rw_1(W)) (BOFT: x·M_n···M_1);
    # "reversed" puts the last one innermost, W' = rw_1(···rw_n(W)) (OFT rotates x by each adapter in turn,
    # x·R_1···R_n, which is W·R_nᵀ···R_1ᵀ on the weight).
    rewrite_order: ClassVar[str] = "active"
    # def regularizer(self, sites) -> loss term: added to the model output's `loss` (when it has one) on every call,
    # `sites` mapping each module path to its live tensors (AdaLoRA's orthogonality penalty).
    regularizer: ClassVar[Callable | None] = None
    # def before_call(self, sites) -> None: runs under no_grad before every call, `sites` as for regularizer; it
    # may change the tensors in place (COFT's projection of OFT's parameters, which HF PEFT does in forward).
    before_call: ClassVar[Callable | None] = None

    def uses(self, hook: str) -> bool:
        """Whether this rule's `hook` has work to do; a rule may say no for its options (OFT without coft projects
        nothing before a call), so calls of such a model run no hook at all."""
        return True


def _check_kind(cls: type) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", cls.kind or ""):
        raise SpecError(f"{cls.__name__}.kind = {cls.kind!r}: set a snake_case name, e.g. kind = 'gated_lora'; it "
                        f"names the spec table [[kind]] and the pass insert-<kind>")
    bad = [s for s in cls.sites if s not in SITE_KINDS]
    mixed = len(cls.sites) > 1 and not set(cls.sites) <= set(WEIGHT_KINDS)
    if bad or not cls.sites or mixed:
        raise SpecError(f"{cls.__name__}.sites = {cls.sites!r}: use 'matmul' and/or 'conv', or one of 'module', "
                        f"'norm', 'attention'")
    if cls.rewrite_weight is not None and not set(cls.sites) <= set(WEIGHT_KINDS):
        raise SpecError(f"{cls.__name__} defines rewrite_weight, which needs a weight: sites must be 'matmul' and/or "
                        f"'conv', not {cls.sites!r}")


def register_method(cls: type) -> type:
    """Make `cls` (a peftc.Method) a method: spec files load it as `[[kind]]`, `insert-<kind>` implements it."""
    from .passes.insert_method import method_pass

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise SpecError(f"register_method needs a subclass of peftc.Method, got {cls!r}")
    if "__dataclass_fields__" not in vars(cls):
        cls = dataclass(frozen=True)(cls)
    _check_kind(cls)
    register_rule(cls)
    method_pass(cls)
    return cls


# ---- insertion -----------------------------------------------------------------------------------------------------

def _weight_site(raw: MatmulSite | ConvSite, weight: torch.Tensor, dtype: torch.dtype, training: bool) -> Site:
    if isinstance(raw, ConvSite):
        n = len(raw.kernel)
        pad = raw.padding if isinstance(raw.padding, str) else tuple(raw.padding) * (n if len(raw.padding) == 1
                                                                                     else 1)
        stride = tuple(raw.stride) * (n if len(raw.stride) == 1 else 1)
        dilation = tuple(raw.dilation) * (n if len(raw.dilation) == 1 else 1)
        return Site("conv", raw.module, raw.weight, tuple(weight.shape), raw.in_features, raw.out_features,
                    training, dtype, stride, pad, dilation, raw.groups)
    return Site("matmul", raw.module, raw.weight, (raw.out_features, raw.in_features), raw.in_features,
                raw.out_features, training, dtype)


def method_sites(gm: GraphModule, ctx, rule: Method) -> list:
    kind = rule.sites[0]
    if kind == "attention":
        return _attention_sites(gm, ctx, rule)
    if kind in ("module", "norm"):
        return _module_sites(gm, ctx, rule, norms_only=kind == "norm")
    target = "all-linear" if rule.target is None else rule.target
    found: list = []
    if "matmul" in rule.sites:
        found += matmul_sites(gm, ctx.params, ctx.info)
    if "conv" in rule.sites and target != "all-linear":  # as LoRA: "all-linear" leaves convolutions alone
        found += conv_sites(gm, ctx.params, ctx.info)
    sites = select(found, target, rule.exclude, ctx.info, where=repr(rule))
    for raw in sites:
        if raw.form == "einsum":
            raise SpecError(f"{rule!r} on `{raw.module}`: an einsum site ({raw.equation}) has no feature-last "
                            f"layout for `site.apply`; exclude this module")
    return sites


@dataclass(frozen=True, eq=False)
class _Output:
    """A site without a weight: the tensor a module call (or an attention) hands on, read outside it."""

    node: Node
    module: str
    x: Any  # a Node, the (q, k, v) Nodes of an attention, or None
    inside: frozenset  # the nodes of the call, whose reads of `node` stay
    site_fields: dict
    adapter_prefix: str = ""
    weight: None = None

    def __post_init__(self):
        object.__setattr__(self, "adapter_prefix", self.module)


def _val(node: Node) -> torch.Tensor | None:
    """The example value of `node`, or of the first tensor it is computed from (peftc's own nodes carry none)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop(0)
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return None


def _module_sites(gm: GraphModule, ctx, rule: Method, norms_only: bool) -> list[_Output]:
    """One site per call of each selected module: the one tensor the call computes and the graph reads outside it.

    x is the call's first input (in graph order) shaped like that output: the hidden states of a block or a norm.
    """
    from .match import _matches

    calls: dict[str, list[Node]] = {}
    paths: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if path:
                calls.setdefault(key, []).append(node)
                paths[key] = path
    types = ctx.info.module_types
    candidates = [k for k in calls if not norms_only or "Norm" in types.get(paths[k], "")]
    chosen = [k for k in candidates if (rule.target is None or _matches(rule.target, paths[k]))
              and (rule.exclude is None or not _matches(rule.exclude, paths[k]))]
    if not chosen:
        import difflib

        names = list(dict.fromkeys(paths[k] for k in candidates))
        wanted = [rule.target] if isinstance(rule.target, str) else list(rule.target or [])
        close = list(dict.fromkeys(c for t in wanted for c in difflib.get_close_matches(t, names, n=3, cutoff=0.3)))
        raise SpecError(f"{rule!r}: target={rule.target!r} matches no {'norm ' if norms_only else ''}module. "
                        f"Closest: {', '.join((close or names)[:5]) or '(none)'} ({len(names)} candidates)")
    sites = []
    for key in chosen:
        inside = frozenset(calls[key])
        outs = [n for n in calls[key] if any(u not in inside for u in n.users)
                and (isinstance(n.meta.get("val"), torch.Tensor) or "val" not in n.meta)
                and not (n.target in _KEEPS and n.args[0] not in inside)]  # its input passed through (a cast)
        path = paths[key]
        if len(outs) != 1:
            raise SpecError(f"{rule!r}: module `{path}` hands {len(outs)} tensors to the rest of the graph "
                            f"({', '.join(n.name for n in outs[:4])}); a module site needs exactly one. Target a "
                            f"submodule instead")
        y, y_val = outs[0], _val(outs[0])
        inputs = [a for n in calls[key] for a in n.all_input_nodes if a not in inside and a.op != "get_attr"]
        same = [a for a in dict.fromkeys(inputs) if (v := _val(a)) is not None and str(v.shape) == str(y_val.shape)]
        x = same[0] if same else None
        sites.append(_Output(y, path, x, inside, dict(
            kind="norm" if norms_only else "module", in_features=int(_val(x).shape[-1]) if x is not None else None,
            out_features=int(y_val.shape[-1]), dtype=_adapter_dtype(y_val.dtype), module_type=types.get(path, ""))))
    return sites


def _attention_sites(gm: GraphModule, ctx, rule: Method) -> list[_Output]:
    """One site per attention (SDPA, or written-out softmax(q k^T) v): y is its output, x its (q, k, v)."""
    from .attention import attention_sites, select_attention

    sites = []
    for a in select_attention(attention_sites(gm), rule.target, where=repr(rule)):
        if rule.exclude is not None:
            from .match import _matches

            if _matches(rule.exclude, a.module):
                continue
        y = a.node if a.form == "sdpa" else a.pv
        val = _val(y)
        sites.append(_Output(y, a.module, (a.q, a.k, a.v), frozenset(), dict(
            kind="attention", in_features=a.head_dim, out_features=a.value_dim, dtype=_adapter_dtype(val.dtype),
            heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim)))
    return sites


def _tensor_args(node: Node) -> bool:
    found = []
    torch.fx.node.map_aggregate((node.args, node.kwargs),
                                lambda a: found.append(a) if isinstance(a, torch.Tensor) else a)
    return bool(found)


def insert_method(gm: GraphModule, ctx, rule: Method, pass_name: str) -> bool:
    """Rewrite every site `rule` selects with its forward; True when something changed."""
    raws = method_sites(gm, ctx, rule)
    sites = [_site(raw, ctx, rule) for raw in raws]
    shared = {}
    for key, param in rule.shared_params(sites).items():
        where = f"{rule!r}: shared parameter `{key}`"
        ctx.params.add(gm, key, lambda p=param, w=where: p.make(sites[0].dtype, _device(ctx, raws[0]), w),
                       method=rule.kind, added_by=pass_name, trainable=param.trainable)
        shared[key] = key
    modified = False
    for raw, site in zip(raws, sites):
        if adapted(raw.node, rule.kind, rule, raw.module):
            continue
        (_insert_weight if type(rule).rewrite_weight is not None else _insert)(gm, ctx, rule, pass_name, raw, site,
                                                                               shared)
        mark_adapted(raw.node, rule.kind, rule)
        ctx.count(f"{pass_name}.inserted")
        modified = True
    return modified


def _site(raw, ctx, rule: Method) -> Site:
    if isinstance(raw, _Output):
        return Site(module=raw.module, weight=None, weight_shape=None, training=ctx.training, **raw.site_fields)
    weight = ctx.params[raw.weight].tensor
    return _weight_site(raw, weight, _adapter_dtype(weight.dtype), ctx.training)


def _device(ctx, raw) -> torch.device:
    return ctx.params[raw.weight].tensor.device if raw.weight is not None else _val(raw.node).device


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    from .passes.insert_lora import adapter_dtype

    return adapter_dtype(dtype)


def _add_params(gm: GraphModule, ctx, rule: Method, pass_name: str, raw, site: Site, shared: dict[str, str]) -> dict:
    device = _device(ctx, raw)
    names = dict(shared)
    for key, param in rule.params(site).items():
        name, where = f"{raw.adapter_prefix}.{key}", f"{rule!r}: parameter `{key}` on `{raw.module}`"
        ctx.params.add(gm, name, lambda p=param, w=where: p.make(site.dtype, device, w), method=rule.kind,
                       added_by=pass_name, trainable=param.trainable)
        names[key] = name
    return names


def _insert_weight(gm: GraphModule, ctx, rule: Method, pass_name: str, raw, site: Site, shared: dict[str, str]) -> None:
    """y = op(x, W)  ==>  y = op(x, rewrite_weight(site, W, p)), W' traced to ATen in front of the weight read."""
    from .merge import _weight_leaf

    names = _add_params(gm, ctx, rule, pass_name, raw, site, shared)
    rewire = _weight_leaf(raw, set())
    if rewire is None:
        raise PassError(f"{rule!r} on `{raw.module}`: its weight reaches the op through a layout op that something "
                        f"else also reads, so it cannot be rewritten for this site alone; exclude this module")
    reader, leaf = rewire
    before = set(gm.graph.nodes)
    tag = {"rule": rule, "site": site, "node": raw.node.name, "params": names, "leaf": leaf.name,
           "raw": dataclasses.replace(raw, node=None)}  # by name, as "node": a merge re-traces W' (dropout off)
    result = _merged_weight(gm, ctx.params, tag, raw, reader, leaf, pass_name, fn=type(rule).rewrite_weight,
                            role=rule.kind)
    reader.replace_input_with(leaf, result)
    result.meta[TAG] = {**tag, "created": [n.name for n in gm.graph.nodes if n not in before]}
    result.meta[REWRITTEN] = raw.weight


def _insert(gm: GraphModule, ctx, rule: Method, pass_name: str, raw, site: Site, shared: dict[str, str]) -> None:
    names = _add_params(gm, ctx, rule, pass_name, raw, site, shared)
    y = raw.node
    base_dtype = ctx.params[raw.weight].tensor.dtype if raw.weight is not None else _val(y).dtype
    anchor = y.next
    before = set(gm.graph.nodes)
    b = NodeBuilder(gm, anchor, pass_name, rule.kind, like=y)
    tracer = GraphAppendingTracer(gm.graph)

    def operand(node):
        if node is None:
            return None
        if site.dtype != base_dtype:  # half-precision base: the adapter computes in float32
            node = b.call(aten.to.dtype, node, site.dtype)
        return Proxy(node, tracer)

    x = tuple(operand(n) for n in raw.x) if isinstance(raw.x, tuple) else operand(raw.x)
    tensors = Tensors({k: Proxy(b.attr(n), tracer) for k, n in names.items()})
    with gm.graph.inserting_before(anchor):
        out = rule.forward(site, x, Proxy(y, tracer), tensors)
    created = [n for n in gm.graph.nodes if n not in before]
    if not isinstance(out, Proxy) or out.node is y:
        raise PassError(f"{type(rule).__name__}.forward on `{raw.module}` returned {type(out).__name__}; it must "
                        f"return a new tensor computed from x, y and its parameters")
    for node in created:
        if _tensor_args(node):
            raise PassError(f"{type(rule).__name__}.forward on `{raw.module}` uses a tensor it did not get as an "
                            f"argument (in `{node.format_node()}`); declare it with params() or shared_params()")
        node.meta.update(b.meta)
    out = out.node
    if site.dtype != base_dtype:
        out = b.call(aten.to.dtype, out, base_dtype)
    out.meta[TAG] = {"rule": rule, "site": site, "node": y.name, "params": names,
                     "created": [n.name for n in created] + [n.name for n in b.created]}
    keep = set(created) | set(b.created)
    if isinstance(raw, _Output):  # the module's own reads of its output stay; what comes after reads the new one
        keep |= raw.inside
    y.replace_all_uses_with(out, delete_user_cb=lambda user: user not in keep)


# ---- training-time hooks ------------------------------------------------------------------------------------------

def site_params(cm, rule: Method) -> dict[str, dict[str, str]]:
    """{module path: {tensor key: parameter name}} of the sites `rule` rewrote in cm (its per-site tensors)."""
    out = {}
    for node in cm.graph_module.graph.nodes:
        tag = node.meta.get(TAG)
        if tag is not None and tag["rule"] == rule:
            out[tag["site"].module] = {k: n for k, n in tag["params"].items() if n != k}
    return out


def with_hook(rules, hook: str) -> tuple:
    """The rules whose method has `hook` ("regularizer": AdaLoRA's orthogonality penalty; "before_call": COFT's
    projection): decided when the model is compiled or its adapter configuration changes (cm._regularizers,
    cm._before_call), so a call scans nothing."""
    return tuple(r for r in rules if getattr(type(r), hook, None) is not None and r.uses(hook))


def add_regularizers(cm, out, rules):
    """out.loss += rule.regularizer(sites) for each of `rules` (cm's regularized rules), as HF PEFT's AdaLoRA adds
    its orthogonality penalty in forward."""
    if not isinstance(getattr(out, "loss", None), torch.Tensor):
        return out
    for rule in rules:
        out.loss = out.loss + rule.regularizer(_live_sites(cm, rule))
    return out


def run_before_call(cm, rules) -> None:
    """rule.before_call(sites) under no_grad for each of `rules` (cm._before_call), before each call (as HF PEFT's
    COFT projects its parameters in place at the start of forward). An entry is a rule of cm's compiled sites, or
    a (rule, sites) pair: a loaded adapter's rule with its own tensors (peftc/adapters.py)."""
    with torch.no_grad():
        for rule in rules:
            rule, sites = rule if isinstance(rule, tuple) else (rule, None)
            rule.before_call(_live_sites(cm, rule) if sites is None else sites)


def _live_sites(cm, rule: Method) -> dict[str, Tensors]:
    """{module path: the live tensors of that site}, the site table cached on cm."""
    cache = cm.__dict__.setdefault("_peftc_regularized_sites", {})
    if rule not in cache:
        cache[rule] = site_params(cm, rule)
    return {m: Tensors({k: cm.get_parameter(n) for k, n in names.items()}) for m, names in cache[rule].items()}


# ---- merging -------------------------------------------------------------------------------------------------------

def merge_methods(gm: GraphModule, scope, pass_name: str) -> int:
    """y = site(x, W) rewritten by a method with a merge  ==>  y = site(x, merge(W)), for the chosen adapters.

    Counts `<pass>.method-<kind>`. A site whose output something else also reads stays as it is (merge() then says
    which adapter did not merge).
    """
    from .merge import _weight_leaf

    table = scope.ctx.params
    hits = _untrained_weight_rewrites(gm, scope, pass_name)
    sites = {s.node: s for s in matmul_sites(gm, table, scope.ctx.info) + conv_sites(gm, table, scope.ctx.info)}
    for out in list(gm.graph.nodes):
        tag = out.meta.get(TAG)
        if tag is None or out._erased or type(tag["rule"]).merge is None or tag["site"].kind not in WEIGHT_KINDS \
                or not _merging(tag, scope):
            continue
        by_name = {n.name: n for n in gm.graph.nodes}
        y = by_name.get(tag["node"])
        site = sites.get(y)
        chain = {by_name[n] for n in tag["created"] if n in by_name} | {out}
        if site is None or any(u not in chain for u in y.users):
            continue
        rewire = _weight_leaf(site, chain)
        if not rewire:
            continue
        reader, leaf = rewire
        reader.replace_input_with(leaf, _merged_weight(gm, table, tag, site, reader, leaf, pass_name))
        out.replace_all_uses_with(y)
        for node in reversed(list(gm.graph.nodes)):  # users first; the forward may hold call_method nodes
            if node in chain and not node.users:
                gm.graph.erase_node(node)
        scope.count(f"{pass_name}.method-{tag['rule'].kind}")
        hits += 1
    return hits


def _merging(tag: dict, scope) -> bool:
    """Whether the merge takes the adapter of this tag: its own tensors chosen, and no shared one left training."""
    per_site = {n for k, n in tag["params"].items() if n != k}
    shared = set(tag["params"].values()) - per_site
    return per_site <= scope.adapters and not any(n not in scope.adapters and scope.ctx.params[n].trainable
                                                   for n in shared)


def _untrained_weight_rewrites(gm: GraphModule, scope, pass_name: str) -> int:
    """W' = rewrite_weight(site, W, p) of a training graph  ==>  the same with site.training=False, for the chosen
    adapters: merging evaluates a weight rewrite without its dropout, as HF PEFT's merge does (BOFT's block
    dropout). Counts `<pass>.untrained-<kind>`; fold-params then folds W' as in an eval graph."""
    from .rewrite import erase_dead

    hits = 0
    for out in list(gm.graph.nodes):
        tag = out.meta.get(TAG)
        if tag is None or "leaf" not in tag or not tag["site"].training or not _merging(tag, scope):
            continue
        by_name = {n.name: n for n in gm.graph.nodes}
        raw, leaf = dataclasses.replace(tag["raw"], node=by_name[tag["node"]]), by_name[tag["leaf"]]
        untrained = {**tag, "site": dataclasses.replace(tag["site"], training=False)}
        for reader in list(out.users):
            reader.replace_input_with(out, _merged_weight(gm, scope.ctx.params, untrained, raw, reader, leaf,
                                                          pass_name, fn=type(tag["rule"]).rewrite_weight,
                                                          role=tag["rule"].kind))
        erase_dead(gm, [out])
        scope.count(f"{pass_name}.untrained-{tag['rule'].kind}")
        hits += 1
    return hits


def _merged_weight(gm: GraphModule, table, tag: dict, raw, reader: Node, leaf: Node, pass_name: str,
                   fn: Callable | None = None, role: str | None = None) -> Node:
    """merge(site, W, p) (or `fn`, rewrite_weight) traced to ATen on the parameters, in W's storage layout and
    dtype."""
    from torch.fx.experimental.proxy_tensor import make_fx

    rule, site, names = tag["rule"], tag["site"], tag["params"]
    fn = fn or type(rule).merge
    what = f"{type(rule).__name__}.{fn.__name__}"
    stored = table[raw.weight].tensor
    in_out = getattr(raw, "weight_in_out", False)
    b = NodeBuilder(gm, reader, pass_name, role or "merge-" + rule.kind, like=raw.node)
    w = leaf if site.dtype == stored.dtype else b.call(aten.to.dtype, leaf, site.dtype)
    if in_out:
        w = b.call(aten.t.default, w)
    keys = list(names)
    example_w = stored.detach().to(site.dtype)
    example_w = example_w.t() if in_out else example_w
    examples = [table[names[k]].tensor.detach() for k in keys]

    def merged(w_, *ts):
        return fn(rule, site, w_, Tensors(zip(keys, ts)))

    with torch.no_grad():
        value = merged(example_w, *examples)
        traced = make_fx(merged)(example_w, *examples)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(example_w.shape):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise PassError(f"{what} on `{raw.module}` returned {got}; it must return W' shaped "
                        f"like W, {tuple(example_w.shape)}")
    env: dict[Node, Any] = dict(zip([n for n in traced.graph.nodes if n.op == "placeholder"],
                                    [w, *[b.attr(names[k]) for k in keys]]))
    result = None
    output = next(n for n in traced.graph.nodes if n.op == "output")
    needed, todo = set(), [output]
    while todo:  # W' and what it is computed from: no argument checks (_linalg_check_errors) left reading p
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    for node in traced.graph.nodes:
        if node.op == "placeholder" or node not in needed:
            continue
        if node.op == "output":
            result = torch.fx.node.map_arg(node.args[0], env.__getitem__)
            break
        if node.op != "call_function":
            raise PassError(f"{what} on `{raw.module}` creates a tensor constant; compute W' "
                            f"from w and the parameters only")
        with gm.graph.inserting_before(reader):
            env[node] = b._tag(gm.graph.node_copy(node, env.__getitem__))
        env[node].meta = dict(b.meta)
    if in_out:
        result = b.call(aten.t.default, result)
    if site.dtype != stored.dtype:
        result = b.call(aten.to.dtype, result, stored.dtype)
    # fold-params names the folded tensor after the one it replaces, so the merged model keeps W's name
    result.meta["peftc.replaces"] = (leaf.target,) if leaf.op == "get_attr" else leaf.meta.get("peftc.replaces", ())
    return result
