FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY bandit_service ./bandit_service
COPY migrations ./migrations
COPY policies ./policies
RUN pip install --no-cache-dir -e .
EXPOSE 8080
CMD ["bandit-service", "serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2"]
