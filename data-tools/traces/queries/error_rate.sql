-- Error rate per service and operation: spans with status error over all spans.
SELECT service,
       name AS operation,
       count(*) AS spans,
       sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors,
       round(sum(CASE WHEN status = 'error' THEN 1.0 ELSE 0.0 END) / count(*), 4) AS error_rate
FROM spans
GROUP BY service, name
ORDER BY error_rate DESC, spans DESC, service, operation;
