"""Ask the Celery broker how many messages wait in a queue (for ``latents_status``).

A passive ``queue_declare`` returns the message count without creating anything; it works the
same on Redis and RabbitMQ. A queue nobody has declared yet holds no messages.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    messages: int | None  # None: the broker could not be asked
    error: str = ""


def queue_depths(queues: list[str], timeout: float = 2.0) -> list[QueueDepth]:
    """Messages waiting in each of ``queues`` on the project's Celery broker."""
    from celery import current_app
    from kombu.exceptions import ChannelError, OperationalError

    try:
        conn = current_app.connection_for_read()
        conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # kombu/amqp/redis raise unrelated types for an unreachable broker
        return [QueueDepth(q, None, f"broker unreachable: {exc}") for q in queues]
    depths = []
    try:
        for queue in queues:
            # A failed passive declare closes the channel on AMQP: one channel per queue.
            channel = conn.channel()
            try:
                _name, messages, _consumers = channel.queue_declare(queue=queue, passive=True)
                depths.append(QueueDepth(queue, int(messages)))
            except Exception as exc:
                if not (isinstance(exc, ChannelError) or _is_not_found(exc)):
                    depths.append(QueueDepth(queue, None, f"{type(exc).__name__}: {exc}"))
                elif hasattr(channel, "_size"):
                    # kombu's virtual transports (Redis, filesystem) count messages directly;
                    # with a Redis global_keyprefix the passive declare's EXISTS is not
                    # prefixed (kombu 5.7) and says "not found" for a queue that has messages.
                    depths.append(QueueDepth(queue, int(channel._size(queue))))
                else:
                    depths.append(QueueDepth(queue, 0, "not declared yet"))
            finally:
                try:
                    channel.close()
                except (OperationalError, OSError, ChannelError):
                    pass
    finally:
        conn.release()
    return depths


def _is_not_found(exc: Exception) -> bool:
    # py-amqp raises amqp.exceptions.NotFound (404) for a passive declare of a missing queue.
    return getattr(exc, "code", None) == 404 or type(exc).__name__ == "NotFound"
