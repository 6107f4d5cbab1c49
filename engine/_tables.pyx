# cython: language_level=3
"""`PolicyTables`: a compiled policy set's numeric tables, bound once (engine/compile.py builds it)."""
import numpy as np
from libc.stdint cimport int64_t


cdef class PolicyTables:
    """The tables of `_tables.pxd` for one policy set, read by the kernel through `t`.

    The arrays are those of `CompiledPolicies` (structured rows whose int64
    fields mirror the structs); they are kept here so the pointers stay valid.
    """

    def __init__(self, *, policies, layers, rules, caps, segments, adjustments, matches, ranges, repeat_factors,
                 identity_rank, rule_candidates, candidate_rules, adjustment_candidates, candidate_adjustments,
                 state_lines):
        arrays = dict(policies=policies, layers=layers, rules=rules, caps=caps, segments=segments,
                      adjustments=adjustments, matches=matches, ranges=ranges, repeat_factors=repeat_factors,
                      identity_rank=identity_rank,
                      rule_candidates=rule_candidates, candidate_rules=candidate_rules,
                      adjustment_candidates=adjustment_candidates, candidate_adjustments=candidate_adjustments,
                      state_lines=state_lines)
        for name, a in arrays.items():
            if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
                raise ValueError(f"kernel tables: '{name}' must be a C-contiguous array")
            if a.dtype.fields is None and a.dtype != np.int64:
                raise ValueError(f"kernel tables: '{name}' must be int64")
            if a.dtype.fields is not None and any(f[0] != np.int64 for f in a.dtype.fields.values()):
                raise ValueError(f"kernel tables: '{name}' rows must be int64 fields")
        self.arrays = arrays
        # rows views: typed memoryviews check each struct's field layout against the dtype
        cdef const PolicyRow[::1] pv = policies
        cdef const LayerRow[::1] lv = layers
        cdef const RuleRow[::1] rv = rules
        cdef const CapRow[::1] cv = caps
        cdef const SegmentRow[::1] sv = segments
        cdef const AdjustmentRow[::1] av = adjustments
        cdef const MatchRow[::1] mv = matches
        cdef const RangeRow[::1] gv = ranges
        cdef const int64_t[::1] rf = repeat_factors
        cdef const int64_t[::1] ir = identity_rank
        cdef const int64_t[:, :, ::1] rc = rule_candidates
        cdef const int64_t[::1] cr = candidate_rules
        cdef const int64_t[:, :, ::1] ac = adjustment_candidates
        cdef const int64_t[::1] ca = candidate_adjustments
        cdef const int64_t[:, ::1] sl = state_lines
        if rc.shape[1] != sl.shape[1] or ac.shape[1] != rc.shape[1]:
            raise ValueError("kernel tables: candidate lists and state lines disagree on the profiles")
        self.policies_view = pv
        self.t.policies = &pv[0] if pv.shape[0] else NULL
        self.t.layers = &lv[0] if lv.shape[0] else NULL
        self.t.rules = &rv[0] if rv.shape[0] else NULL
        self.t.caps = &cv[0] if cv.shape[0] else NULL
        self.t.segments = &sv[0] if sv.shape[0] else NULL
        self.t.adjustments = &av[0] if av.shape[0] else NULL
        self.t.matches = &mv[0] if mv.shape[0] else NULL
        self.t.ranges = &gv[0] if gv.shape[0] else NULL
        self.t.repeat_factors = &rf[0] if rf.shape[0] else NULL
        self.t.identity_rank = &ir[0] if ir.shape[0] else NULL
        self.t.rule_candidates = &rc[0, 0, 0] if rc.shape[0] else NULL
        self.t.candidate_rules = &cr[0] if cr.shape[0] else NULL
        self.t.adjustment_candidates = &ac[0, 0, 0] if ac.shape[0] else NULL
        self.t.candidate_adjustments = &ca[0] if ca.shape[0] else NULL
        self.t.state_lines = &sl[0, 0] if sl.shape[0] else NULL
        self.t.profiles = rc.shape[1]
        self.t.policy_count = pv.shape[0]

    def __reduce__(self):
        return _rebuild, (self.arrays,)


def _rebuild(arrays):
    return PolicyTables(**arrays)
