-- Where the time goes for late messages: traces slower than 100 ms end to end, and the
-- self time (own duration minus its children's) of each service and operation in them.
-- The late traces' spans are picked first, so the self-time join only holds those (a hash
-- join does not spill: over the whole store it ran out of the runner's memory limit).
WITH trace_time AS (
    SELECT trace_id, max(end_ns) - min(start_ns) AS e2e_ns FROM spans GROUP BY trace_id
),
late_spans AS (
    SELECT s.trace_id, s.span_id, s.parent_span_id, s.service, s.name, s.duration_ns
    FROM spans s
    WHERE s.trace_id IN (SELECT trace_id FROM trace_time WHERE e2e_ns > 100000000)
),
children AS (
    SELECT trace_id, parent_span_id AS span_id, sum(duration_ns) AS child_ns
    FROM late_spans WHERE parent_span_id <> '' GROUP BY trace_id, parent_span_id
)
SELECT s.service,
       s.name AS operation,
       count(*) AS spans,
       round(sum(greatest(s.duration_ns - coalesce(c.child_ns, 0), 0)) / 1e6, 3) AS self_ms
FROM late_spans s
LEFT JOIN children c ON c.trace_id = s.trace_id AND c.span_id = s.span_id
GROUP BY s.service, s.name
ORDER BY self_ms DESC, s.service, operation;
