"""The metric names a PromQL expression reads (for the Grafana dashboard's tests): identifiers
that are not functions, aggregation operators, keywords or label names."""

from __future__ import annotations

import re

FUNCTIONS = frozenset("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
    double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
    sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh
    time timestamp vector year
""".split())
AGGREGATIONS = frozenset("avg bottomk count count_values group limit_ratio limitk max min quantile stddev stdvar sum topk".split())
KEYWORDS = frozenset("and atan2 bool by group_left group_right ignoring inf nan offset on or unless without".split())
# Label lists of grouping and vector matching: names there are labels, not metrics.
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\()?)")  # not in 5m, 1e3, $x


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` reads. An unknown function name is an error, not a metric."""
    expr = _STRINGS.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries, with Grafana's $__rate_interval
    expr = _LABEL_LISTS.sub("", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        word, called = match[0], match[1] is not None
        if called and word not in FUNCTIONS | AGGREGATIONS:
            raise ValueError(f"{word!r} in {expr!r} is called like a function but is not a PromQL one")
        if word not in FUNCTIONS | AGGREGATIONS | KEYWORDS:
            names.add(word)
    return names
