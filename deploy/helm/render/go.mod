module push-platform/deploy/helm/render

go 1.19
