# The compiled policy tables as the kernel reads them, and the codes the kernel
# modules share.
#
# Every table row is a struct of int64 so that a numpy structured array with
# the same field order (engine/compile.py builds them from *_FIELDS there) is
# read here through a typed memoryview, with no Python object per row.
# `PolicyTables` binds them once per policy set (built by engine/compile.py), in
# the manner of scikit-learn's Tree: the loop reads raw pointers out of it.

from libc.stdint cimport int64_t

ctypedef struct PolicyRow:
    int64_t layer_start
    int64_t layer_count
    int64_t includes_class_b_copay
    int64_t repeat_start        # into repeat_factors
    int64_t repeat_count
    int64_t repeat_floor        # fen
    int64_t identity_mask       # bits of the global identity ids it declares
    int64_t rank_start          # into identity_rank: global ids, most favourable first
    int64_t rank_count
    int64_t acc_width           # accumulator columns (layer, cap group or none) of its year's versions
    int64_t year_identity_mask  # bits of the names any version of its year declares
    int64_t key_policy          # its year's first version: the policy its accumulator keys are under

ctypedef struct LayerRow:
    int64_t fund
    int64_t rule_start
    int64_t rule_count
    int64_t adjustment_start
    int64_t adjustment_count
    # What the spec says of the first layer, as data (engine/compile.py sets them there):
    int64_t base_kind           # BASE_* below: what the layer's rule is applied to
    int64_t required            # 1: no matching rule is NO_BENEFIT_RULE, found before anything changes
    int64_t repeat_applies      # 1: repeat-admission factors may lower its claim-axis deductibles
    int64_t reports_deductible  # 1: what its rule charges is the claim's deductible_applied

ctypedef struct RuleRow:
    int64_t kind                # RULE_* below
    int64_t match
    int64_t deductible          # fen
    int64_t axis                # 0 claim, 1 year
    int64_t above_deductible    # segment bounds measured from the deductible
    int64_t repeat_admission
    int64_t acc                 # accumulator column of its first cap group (or none) within the width
    int64_t cap                 # fen, its first cap group's cap before the cap factor; -1 uncapped
    int64_t cap_start           # into caps: its other cap groups (nested caps), in order
    int64_t cap_count
    int64_t segment_start
    int64_t segment_count
    int64_t ratio_a             # class ratios, bp
    int64_t ratio_b
    int64_t amount              # fixed_amount fen, or max_personal_share bp
    int64_t position_at         # where its column's fields sit in a state row (compile._state_layout);
    int64_t paid_at             # -1 for a field no rule of the policy writes
    int64_t charged_at

ctypedef struct CapRow:         # a rule's cap group after its first (spec 5.2 step 7: nested caps)
    int64_t acc                 # its accumulator column
    int64_t paid_at             # where its paid sits in a state row
    int64_t cap                 # fen, before the cap factor

ctypedef struct SegmentRow:
    int64_t upto                # fen; -1 for the last, open segment
    int64_t ratio               # bp

ctypedef struct AdjustmentRow:
    int64_t match
    int64_t deductible_factor   # bp; 10000 when absent
    int64_t ratio               # bp; -1 when absent
    int64_t ratio_add           # bp, signed; 0 when absent
    int64_t cap_factor          # bp; 10000 when absent
    int64_t uncapped            # 1: lifts every cap of the rule

ctypedef struct MatchRow:
    int64_t visit_mask          # bit per enum code; all bits when absent
    int64_t level_mask
    int64_t locality_mask
    int64_t referred_mask       # bit 0: not referred passes, bit 1: referred passes
    int64_t effective_mask      # bit e + 1: effective identity e passes, bit 0: none; all when absent
    int64_t holds_mask          # global identity bits, or bit 63 alone when absent
    int64_t disease_start       # into disease ranges; disease_count -1 when absent
    int64_t disease_count
    int64_t min_age             # -1 when absent
    int64_t max_age             # MAX_AGE_ANY when absent
    int64_t profile_only        # 1: no condition beyond visit type, level and locality

ctypedef struct RangeRow:
    int64_t low                 # encoded 3-character ICD-10 categories, inclusive
    int64_t high

# Raw pointers into the arrays a PolicyTables holds, valid while it lives.
ctypedef struct Tables:
    const PolicyRow* policies
    const LayerRow* layers
    const RuleRow* rules
    const CapRow* caps
    const SegmentRow* segments
    const AdjustmentRow* adjustments
    const MatchRow* matches
    const RangeRow* ranges
    const int64_t* repeat_factors
    const int64_t* identity_rank
    const int64_t* rule_candidates        # [layers, profiles, 2]: start, count into candidate_rules
    const int64_t* candidate_rules
    const int64_t* adjustment_candidates  # [layers, profiles, 2]
    const int64_t* candidate_adjustments
    const int64_t* state_lines            # [policies, profiles]: cache lines of a state row to prefetch
    int64_t profiles
    int64_t policy_count


cdef class PolicyTables:
    cdef Tables t
    cdef readonly object arrays     # name -> numpy array, kept alive and for pickling
    cdef const PolicyRow[::1] policies_view


cdef enum:
    RULE_SEGMENTS = 0
    RULE_CLASS_RATIO = 1
    RULE_FIXED_AMOUNT = 2
    RULE_MAX_PERSONAL_SHARE = 3

cdef enum:
    BASE_IN_SCOPE = 0           # the claim's in-scope amount (the first layer)
    BASE_REMAINING = 1          # its compliant amount less what the layers before paid

cdef enum:
    VISIT_INPATIENT = 0
    # a claim's profile is (visit * PROFILE_LEVELS + level) * PROFILE_LOCALITIES + locality
    PROFILE_LEVELS = 3
    PROFILE_LOCALITIES = 4

# Status codes: index into engine.schema.STATUSES.
cdef enum:
    OK = 0
    MISSING_FIELD = 1
    INVALID_VALUE = 2
    INVALID_AMOUNT = 3
    AMOUNT_OUT_OF_RANGE = 4
    AMOUNT_MISMATCH = 5
    UNKNOWN_POLICY = 6
    UNKNOWN_IDENTITY = 7
    DUPLICATE_CLAIM = 8
    NO_BENEFIT_RULE = 9

cdef enum:
    ACC_FIELDS_C = 3  # position, paid, deductible_charged per accumulator column
    STATE_HEAD_C = 2  # admissions, compliant_total before the columns of a state row

# Trace fields written per layer for `engine.explain`.
cdef enum:
    TR_RULE = 0
    TR_BASE = 1
    TR_DEDUCTIBLE_RULE = 2
    TR_FACTOR_G = 3
    TR_DEDUCTIBLE = 4
    TR_START = 5
    TR_END = 6
    TR_RATIO_REPLACE = 7
    TR_RATIO_ADD = 8
    TR_RAW = 9
    TR_CAP = 10
    TR_PAID_BEFORE = 11
    TR_PAY = 12
    TR_DEDUCTIBLE_CHARGED = 13
    TR_REPEAT_FACTOR = 14
    TR_NFIELDS = 15
