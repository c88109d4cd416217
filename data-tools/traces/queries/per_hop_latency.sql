-- Latency of each hop of the push path: spans, p50, p99 and max per service and operation (ms).
SELECT service,
       name AS operation,
       count(*) AS spans,
       round(approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) / 1e6, 3) AS p50_ms,
       round(approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) / 1e6, 3) AS p99_ms,
       round(max(duration_ns) / 1e6, 3) AS max_ms
FROM spans
GROUP BY service, name
ORDER BY p99_ms DESC, service, operation;
