"""The parts of the assignment: one literal table, in the order a student should work through them.

Each part names the file and function(s) whose `# BEGIN SOLUTION` / `# END SOLUTION` regions a student
writes, what the `NotImplementedError` left in their place says, the points, and the handout's text:
what to implement, the equations, how it is graded. Its checks and reference values live in
`minisnip/classroom/graders/<name>.py` (`make_cases()` run at make time on the full library, then the
`test_*` checks run on the student's copy).

Adding a part: put markers around the region(s) in the library, add one `Part` here, and write its grader
file; `make` and `grade` need no other change.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Part:
    """One gradable piece of the assignment."""

    name: str
    file: str                    # relative to the folder that holds the `minisnip` package
    functions: dict[str, str]    # qualified function name -> what the student writes there (the raise message)
    points: int
    summary: str                 # what to implement (handout)
    equations: str               # the maths, plain text (handout, shown as a code block)
    grading: str                 # how it is graded (handout)

    @property
    def module(self) -> str:
        """The file as a module name: "minisnip/model.py" -> "minisnip.model"."""
        return self.file.removesuffix(".py").replace("/", ".")


PARTS: tuple[Part, ...] = (
    Part(
        name="attention",
        file="minisnip/model.py",
        functions={
            "attention_head": "compute softmax(q k^T / sqrt(d)) v for one head, "
                              "with scores set to -inf where mask is False",
            "project_heads": "project each head's context with its columns of W_O, sum over the heads, add b_O",
        },
        points=20,
        summary="One attention head written out, and the output projection of all heads. The model's fast path "
                "(`Attention.context` / `Attention.project`) does the same for all heads in one fused call; your "
                "two functions are the readable reference it is checked against.",
        equations="head(q, k, v) = softmax(q k^T / sqrt(d) + M) v     M[i, j] = 0 where mask[i, j] else -inf\n"
                  "    q: (..., S_q, d)   k: (..., S_k, d)   v: (..., S_k, d_v)   ->  (..., S_q, d_v)\n"
                  "    softmax over the key axis (the last one)\n"
                  "Attn(x) = W_O [ctx_1; ...; ctx_H] + b_O = sum_h ctx_h W_O[:, h*d:(h+1)*d]^T + b_O\n"
                  "    ctx: (batch, H, S, d)   W_O: (hidden, H*d)   ->  (batch, S, hidden)",
        grading="Compared with reference values (float32 and float64, with and without a mask, with and without "
                "b_O) and with torch's fused `scaled_dot_product_attention`; properties: every row of the "
                "attention matrix sums to 1 (constant values come back unchanged), masked keys have no "
                "influence, gradients reach q, k and v; `project_heads` equals `Attention.project`, and the two "
                "functions together give the model's attention block output `Attention.forward`.",
    ),
    Part(
        name="keep_heads",
        file="minisnip/model.py",
        functions={
            "Attention.keep_heads": "shrink qkv (the Q, K and V rows of the kept heads, in keep's order) and out "
                                    "(their columns) with _select_linear, and carry head_gate along",
        },
        points=15,
        summary="Physical removal of attention heads: keep only the heads at local indices `keep`, so that the "
                "smaller block computes what the gated block (removed heads' gate = 0) computed. "
                "`Attention.head_rows(h)` and `Attention.head_columns(h)` say where head h lives; "
                "`_select_linear(linear, index, dim)` builds the smaller Linear; the line after your code "
                "updates `self.heads`.",
        equations="W_QKV = [W_Q; W_K; W_V], rows of head h: head_rows(h) = (Q rows, K rows, V rows)\n"
                  "new W_QKV = [W_Q[rows of keep]; W_K[rows of keep]; W_V[rows of keep]]  (biases alike)\n"
                  "new W_O   = W_O[:, columns of keep]                                   (b_O unchanged)\n"
                  "new head_gate = head_gate[keep]   (when a head gate is set)",
        grading="The new weights and biases are compared with reference values (kept heads in order, reordered, "
                "a single head); the block then computes exactly what the original block with the removed heads "
                "gated to 0 computes; the head gate is carried along; the new layers are trainable Linears; "
                "`minisnip.surgery.prune_heads` on a whole model gives the gated model's outputs.",
    ),
    Part(
        name="function_norms",
        file="minisnip/snip/norms.py",
        functions={
            "function_norms": "add up batch_sq_norms over all batches into names, total (float64) and count "
                              "(real tokens); then norms = sqrt(total / count) per branch, as a list",
        },
        points=10,
        summary="The function norm of every residual branch over a calibration set: the root mean square of the "
                "branch's own output over all real (non-padding) tokens of the whole set. "
                "`batch_sq_norms(enc, trace, mask, kinds, neuron_group_size)` gives one batch's (names, summed "
                "squared norms, number of real tokens); the loop around your code runs the encoder with a trace.",
        equations="||f_m|| = sqrt( sum_{batches} sum_{real tokens t} ||f_m(x_t)||^2  /  number of real tokens )\n"
                  "        (one mean over the whole set, not a mean of per-batch means)",
        grading="Compared with reference values (heads, blocks, neuron groups, param_weighted); properties: one "
                "batch or the same tokens split into two batches give the same norms, extra padding changes "
                "nothing, a gated head has norm 0, scaling a branch's output by a scales its norm by |a|, a "
                "model in training mode gives the eval-mode norms and stays in training mode.",
    ),
    Part(
        name="identity_prior",
        file="minisnip/snip/prior.py",
        functions={
            "identity_prior": "turn the summed squared norms into norms sqrt(max(sums / count, 1e-20)) "
                              "and return their sum, weighted by w when w is not None",
        },
        points=15,
        summary="SNIP's identity prior on one batch: a group lasso on functions that pushes whole branches "
                "toward f_m = 0 (the identity of the residual sum). `names, sums, count` (summed squared norms "
                "over the batch's real tokens, and their number) and the weights `w` (None or one per name) are "
                "computed before your code.",
        equations="R = sum_m w_m ||f_m||,   ||f_m|| = sqrt( max( sums_m / count, 1e-20 ) )\n"
                  "    (the floor makes the gradient at a zero branch 0 instead of NaN)",
        grading="Values and gradients compared with reference values (no weights, weights='params', a dict of "
                "weights); properties: a 0-dim differentiable tensor, R = 0 with finite gradients when every "
                "penalised branch outputs 0, positive homogeneity (scaling the penalised branches' outputs by "
                "a > 0 scales R by a), padding does not count.",
    ),
    Part(
        name="power_iteration",
        file="minisnip/snip/spectral.py",
        functions={
            "power_iteration": "run n_iter steps v = W^T u / ||W^T u||, u = W v / ||W v|| without gradient "
                               "(F.normalize with eps), then return (u^T W v, u, v)",
        },
        points=15,
        summary="Power iteration (Miyato et al. 2018, Alg. 1) for the largest singular value of W, the estimate "
                "spectral normalization divides by.",
        equations="repeat n_iter times:   v <- W^T u / ||W^T u||,   u <- W v / ||W v||\n"
                  "sigma_hat = u^T W v      (differentiable w.r.t. W; u and v carry no gradient)",
        grading="Compared with reference values (1, 3 and 10 steps; float32 and float64); properties: u and v "
                "are unit vectors, sigma_hat = u^T W v, with many steps sigma_hat matches the SVD's largest "
                "singular value and never exceeds it, d sigma_hat / dW = u v^T while u and v need no gradient.",
    ),
    Part(
        name="spectral_rescale",
        file="minisnip/snip/spectral.py",
        functions={
            "spectral_rescale": "scale each block by min(1, bound / max(sigma, eps))",
        },
        points=10,
        summary="The rescaling of spectral normalization as SNIP's companion paper SNGP uses it: a matrix whose "
                "spectral norm exceeds the bound c is scaled down to c, a smaller one is left as it is. "
                "`SpectralNorm.forward` calls it with the power-iteration estimate.",
        equations="W_SN = W * min(1, c / sigma_hat(W)) = W / max(1, sigma_hat(W) / c)     per block b\n"
                  "    mats: (blocks, rows, in)   sigma, bound: (blocks,)   sigma floored at eps",
        grading="Compared with reference values; properties: blocks under their bound come back unchanged, "
                "blocks over it end with spectral norm c, an all-zero block gives zeros (no NaN), the result is "
                "differentiable w.r.t. mats and sigma.",
    ),
    Part(
        name="thresholding",
        file="minisnip/pruning/select.py",
        functions={
            "select_below_threshold": "return the names whose score is below tau, in the order of scores "
                                      "(check each score with _check_score)",
            "select_for_target": "take the branches in ascending order of score into plan, updating removed, "
                                 "until removed >= need - 1e-9; then return plan.names()",
        },
        points=15,
        summary="SNIP's thresholding operator on the function norms, and the same operator run until a target "
                "compression is reached. In `select_for_target`, `score` (per_param already applied), `removed` "
                "(weights removed so far), `need` and an empty `RemovalPlan` are ready: `plan.add(branch)` "
                "returns its layer, `plan.removed_params(layer)` the weights that layer loses so far (a head "
                "inside a removed block adds nothing), `plan.leaves_something()` whether any block survives, "
                "`plan.names()` the canonical names. Raise PruningError when reaching the target would leave no "
                "attention or feed-forward block at all (unless allow_empty).",
        equations="select_below_threshold: { m : score_m < tau }   (strictly below, order kept)\n"
                  "select_for_target: sort branches by score ascending; take them one by one until\n"
                  "    removed weights >= target * dense weights; that set = thresholding at a tau just above\n"
                  "    the last branch taken",
        grading="Compared with reference selections (several targets, per_param, heads + blocks + neuron "
                "groups); properties: the operator is strict and keeps the order of `scores`; the chosen set "
                "reaches the target and is the smallest prefix in score order that does; an unreachable target "
                "raises ValueError and one that removes every block raises PruningError.",
    ),
    Part(
        name="movement",
        file="minisnip/methods/movement.py",
        functions={
            "top_v_masks": "return one bool mask per score matrix, False at the round(sparsity * n) smallest "
                           "scores of each matrix (scope 'per-matrix') or of all matrices together ('global')",
            "StraightThroughMask.forward": "return the mask keep as a tensor of the scores' dtype",
            "StraightThroughMask.backward": "pass the incoming gradient to the scores unchanged (None for keep)",
            "MaskedWeight.forward": "return W' = W ⊙ M with M from StraightThroughMask on this matrix's scores "
                                    "and mask (self.state), so that the scores get dL/dW' ⊙ W",
        },
        points=15,
        summary="The learned scores of movement pruning (Sanh, Wolf & Rush, NeurIPS 2020). Every weight W_ij of "
                "a pruned matrix has a score S_ij (`MaskState.scores`, a Parameter trained with the model); the "
                "forward pass uses W' = W ⊙ M with the binary mask M = Top_v(S) (`MaskState.keep`, recomputed "
                "from S once per step by the training hook). M is not differentiable, so the straight-through "
                "estimator hands dL/dM to S unchanged: the scores learn from the weights' movement. "
                "`attach_scores` puts `MaskedWeight` on a Linear as a parametrization (the layer then computes "
                "with W' while W itself is kept); `StraightThroughMask` is also what the structured variant "
                "(`movement_structured.py`) uses on its gates.",
        equations="Top_v(S): 1 for the v = n - round(sparsity * n) largest scores, 0 for the others\n"
                  "    per-matrix: n = the matrix's size;  global: one ranking over all N scores, n = N\n"
                  "    (Python's round; exactly that many ones also when scores tie, e.g. all S = 0 at the start)\n"
                  "StraightThroughMask:  forward(S, M) = M            backward: dL/dS = dL/dM\n"
                  "W' = W ⊙ M(S)   =>   dL/dW = dL/dW' ⊙ M,   dL/dS = dL/dM = dL/dW' ⊙ W\n"
                  "a gradient step:  S <- S - lr * W ⊙ dL/dW'   (masked weights' scores move too)",
        grading="Top_v masks compared with reference masks (five sparsities, both scopes); properties: bool masks "
                "of the scores' shapes with exactly n - round(sparsity n) ones (per matrix, or over all) also "
                "for tied and all-zero scores, the largest scores kept, the scores left unchanged. "
                "StraightThroughMask: forward is the mask in the scores' dtype and differentiable, backward is "
                "the identity (masked entries included). MaskedWeight: W' and the gradients of S and W compared "
                "with reference values; W' = W ⊙ M, dL/dS = W ⊙ dL/dW' exactly (not dL/dW'), dL/dW = dL/dW' ⊙ M, "
                "one SGD step moves S by -lr W ⊙ dL/dW'; a Linear with `attach_scores` computes x (W ⊙ M)^T + b "
                "and gives its scores W ⊙ R^T x for L = sum(y ⊙ R).",
    ),
    Part(
        name="distillation",
        file="minisnip/pruning/distill.py",
        functions={
            "distillation_loss": "convert both logits to float32 (the teacher's detached); return the MSE when "
                                 "regression, else T^2 * KL(softmax(t/T) || softmax(s/T)) averaged over the batch",
        },
        points=10,
        summary="The knowledge-distillation loss (Hinton, Vinyals & Dean 2015) that pulls a pruned student "
                "toward its fine-tuned teacher: the KL divergence between the temperature-softened class "
                "distributions, scaled by T^2 so that changing T leaves the gradients' scale alone. A "
                "regression task (STS-B, one output) has no distribution: the loss is the mean squared error to "
                "the teacher's prediction. The shape check before your code is done; `DistillHook` adds "
                "alpha times your loss to the task loss.",
        equations="p = softmax(t / T),  q = softmax(s / T)        (over the classes; s, t: (batch, classes))\n"
                  "L_KD = T^2 * (1 / batch) sum_b sum_i p_bi (log p_bi - log q_bi)\n"
                  "    = T^2 * KL(p || q) averaged over the batch   (F.log_softmax, F.kl_div may help)\n"
                  "regression (one output): L_KD = mean_b (s_b - t_b)^2   (no temperature)\n"
                  "the teacher's logits are a fixed target (no gradient); compute in float32",
        grading="Values and the student's gradients compared with reference values (temperatures 0.5 to 4; "
                "float32, float64 and bfloat16 logits; regression); properties: a 0-dim loss, 0 with zero "
                "gradient for identical logits, never negative, L(c s, c t, c T) = c^2 L(s, t, T) (the T^2 "
                "factor), the batch's loss is the mean of its rows' and equals the KL written out, the teacher's "
                "logits get no gradient, half-precision logits give a float32 loss, the regression loss is "
                "mean((s - t)^2) whatever T with gradient 2 (s - t) / batch.",
    ),
)


def part_names() -> list[str]:
    return [p.name for p in PARTS]


def get_parts(names: list[str] | None) -> list[Part]:
    """The parts named (all when None or empty), in table order; UsageError naming the valid ones otherwise."""
    if not names:
        return list(PARTS)
    unknown = [n for n in names if n not in part_names()]
    if unknown:
        raise UsageError(f"unknown part{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"valid parts: {', '.join(part_names())}")
    return [p for p in PARTS if p.name in names]


__all__ = ["PARTS", "Part", "get_parts", "part_names"]
