"""The engine loop: schedule -> run -> process, and the thread that serves it to asyncio."""
