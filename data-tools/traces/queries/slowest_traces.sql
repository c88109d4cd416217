-- The 20 slowest traces end to end: first span start to last span end, with their root.
SELECT trace_id,
       round((max(end_ns) - min(start_ns)) / 1e6, 3) AS end_to_end_ms,
       count(*) AS spans,
       count(DISTINCT service) AS services,
       max(CASE WHEN parent_span_id = '' THEN service || ' ' || name END) AS root
FROM spans
GROUP BY trace_id
ORDER BY end_to_end_ms DESC, trace_id
LIMIT 20;
